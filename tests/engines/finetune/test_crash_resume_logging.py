"""A finetuning run killed with SIGKILL after its last epoch-end checkpoint, then resumed: MLflow holds every metric
step exactly once and the same values as an uninterrupted run (``checkpoints/mlflow.json``,
:mod:`medssl.engines.finetune.ledger`). Real hippocampus volumes, a tiny SegResNet, local sqlite MLflow; each run
is a subprocess with one thread (the uninterrupted one too, so the numbers are bit for bit comparable)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.runtime.ledger import LEDGER_FILE
from medssl.tracking.mlflow_tracker import make_client
from tests.engines.finetune.test_engine import hippo, seg_config  # noqa: F401 (fixture)
from tests.tracking._crash_runs import histories, run_killable

#: run_finetune(resume="auto") in a fresh process; argv: config JSON, kill step (0: none), the tracker's
#: flush_every_s, result file. The kill comes right after the validation of that step reached _record.
SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import Finetuner, run_finetune
from medssl.tracking.mlflow_tracker import MlflowTracker

cfg = FinetuneConfig.from_dict(json.loads(sys.argv[1]))
kill_at, out = int(sys.argv[2]), sys.argv[4]
MlflowTracker.__init__.__kwdefaults__["flush_every_s"] = float(sys.argv[3])
real_record = Finetuner._record

def record(self, logs):
    real_record(self, logs)
    if self.step == kill_at and any(k.startswith("val_") for k in logs):
        os.kill(os.getpid(), signal.SIGKILL)

Finetuner._record = record
res = run_finetune(cfg, resume="auto", progress=False)
open(out, "w").write(json.dumps({"run_id": res.run_id, "test": res.test_metrics, "val": res.best_val}))
"""

KILL_AT = 4  # 2 steps an epoch: last.pt at step 2; killed after step 4's validation, before epoch 1's end


def run_script(tmp: Path, cfg: Any, kill_at: int = 0, flush_every_s: float = 5.0) -> dict[str, Any] | None:
    script, out = tmp / "run_ft.py", tmp / f"result-{kill_at}.json"
    script.write_text(SCRIPT)
    return run_killable(script, [json.dumps(cfg.to_dict()), str(kill_at), str(flush_every_s), str(out)], out, kill_at, tmp)



def same(a: dict[str, list[tuple[int, float]]], b: dict[str, list[tuple[int, float]]]) -> bool:
    def norm(h: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, Any]]]:
        return {k: [(s, "nan" if math.isnan(v) else v) for s, v in rows] for k, rows in h.items()}

    return norm(a) == norm(b)


def config(data: tuple[Path, Path], out: Path, uri: str) -> Any:
    return seg_config(data, out, max_epochs=3, val_every_steps=1, experiment="ft-crash", tracking_uri=uri)


@pytest.fixture(scope="module")
def straight(hippo, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:  # noqa: F811
    """The uninterrupted run: its result and its MLflow metric histories."""
    tmp = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    res = run_script(tmp, config(hippo, tmp / "run", uri))
    return res, histories(uri, res["run_id"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flush_every_s", [0.0, 5.0], ids=["sent-at-once", "buffered"])
def test_sigkilled_run_resumes_logging_each_step_once(
    hippo, straight, tmp_path: Path, flush_every_s: float  # noqa: F811
) -> None:
    """``sent-at-once``: every record reached MLflow before the kill (a run whose steps outlast the tracker's flush
    interval), so a resume that re-sent the redone steps would double them. ``buffered``: the tracker's default
    5-s flush; what was still queued at the kill is lost with the process and must be sent by the resume."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = config(hippo, tmp_path / "run", uri)
    run_script(tmp_path, cfg, kill_at=KILL_AT, flush_every_s=flush_every_s)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 2 < KILL_AT  # the validations at steps 3 and 4 happened after the checkpoint
    run_id = last["mlflow_run_id"]
    client = make_client(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nothing closed it
    ledger = json.loads((tmp_path / "run" / LEDGER_FILE).read_text())
    assert ledger["run_id"] == run_id
    if flush_every_s == 0.0:
        assert [m.step for m in client.get_metric_history(run_id, "val_dice_mean")] == [1, 2, 3, 4]
        assert ledger["logged"]["val_dice_mean"] == KILL_AT and ledger["logged"]["train_loss"] == 2

    res = run_script(tmp_path, cfg, flush_every_s=flush_every_s)  # what the requeued job runs

    ref, ref_hist = straight
    assert res["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    hist = histories(uri, run_id)
    for key, rows in hist.items():
        steps = [s for s, _ in rows]
        assert len(steps) == len(set(steps)), (key, steps)  # each step once
    assert sorted(hist) == sorted(ref_hist)
    assert same(hist, ref_hist)  # every key, step and value of the uninterrupted run
    assert [s for s, _ in hist["val_dice_mean"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in hist["train_loss"]] == [2, 4, 6]
    assert res["test"] == ref["test"] and res["val"] == ref["val"]
