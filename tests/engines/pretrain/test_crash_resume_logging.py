"""A pretraining run killed with SIGKILL after some logged steps past its last checkpoint, then resumed
(``resume="auto"``, what a requeued job runs): MLflow holds every metric step exactly once with the values of an
uninterrupted run, kNN monitor scores included, and ``metrics.jsonl`` equals the uninterrupted run's line for line
(``checkpoints/mlflow.json``, :mod:`medssl.engines.runtime.ledger`; :class:`~medssl.engines.pretrain.handlers.MlflowLogger`).
Real hippocampus volumes, SimCLR on a tiny ResNet-10, 16³ views, local sqlite MLflow; each run is a subprocess with
one thread (the uninterrupted one too, so the numbers are bit for bit comparable)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from medssl.config import PretrainConfig
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.tracking.mlflow_tracker import make_client
from tests.tracking._crash_runs import histories, run_killable

LEDGER = "checkpoints/mlflow.json"  # spelled out: the test also runs against code that predates the ledger

#: run_pretraining(resume="auto") in a fresh process with the CLI's handlers plus a last one that SIGKILLs the
#: process once step ``kill_at`` (0: never) has been through every handler (its checkpoint, when due, written);
#: argv: config JSON, kill step, the tracker's flush_every_s ("default": the tracker's own), result file
SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from medssl.config import PretrainConfig
from medssl.engines.pretrain import default_handlers, run_pretraining
from medssl.tracking.mlflow_tracker import MlflowTracker

cfg = PretrainConfig.from_dict(json.loads(sys.argv[1]))
kill_at, out = int(sys.argv[2]), sys.argv[4]
if sys.argv[3] != "default":
    MlflowTracker.__init__.__kwdefaults__["flush_every_s"] = float(sys.argv[3])

class Kill:
    def iteration_completed(self, trainer):
        if trainer.state.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

res = run_pretraining(cfg, resume="auto", progress=False, handlers=[*default_handlers(False), Kill()])
open(out, "w").write(json.dumps({"run_id": res.run_id, "losses": res.loss_history}))
"""

STEPS, CKPT_EVERY, MONITOR_EVERY = 10, 4, 3  # checkpoints at 4, 8, 10; kNN probes at 0, 3, 6, 9
TIMING = {"monitor/seconds"}  # wall-clock values: their steps must match, not their values


def run_script(tmp: Path, cfg: PretrainConfig, kill_at: int = 0, flush: str = "default") -> dict[str, Any] | None:
    script, out = tmp / "run_pt.py", tmp / f"result-{kill_at}.json"
    script.write_text(SCRIPT)
    return run_killable(script, [json.dumps(cfg.to_dict()), str(kill_at), flush, str(out)], out, kill_at, tmp)



def comparable(hist: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, Any]]]:
    """Histories with timing values blanked (their steps kept) and NaN made comparable."""
    return {k: [(s, None if k in TIMING else "nan" if math.isnan(v) else v) for s, v in rows]
            for k, rows in hist.items()}  # fmt: skip


def lines(out: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` with timing values blanked."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: None if k in TIMING else v for k, v in row.items()} for row in rows]


def config(pool: Path, out: Path, uri: str) -> PretrainConfig:
    return PretrainConfig(
        datalist=str(pool), method="simclr", encoder="resnet3d", encoder_kwargs={"depth": 10, "widen_factor": 0.25},
        roi_size=[16, 16, 16], batch_size=2, total_steps=STEPS, lr=1e-3, warmup_steps=2, device="cpu",
        deterministic=True, checkpoint_every=CKPT_EVERY, keep_checkpoints=1, log_every=1,
        monitor_every=MONITOR_EVERY, monitor_cases=4, preview=False, out_dir=str(out), experiment="pt-crash",
        tracking_uri=uri,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pool(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 real labelled hippocampus cases (the labels feed the kNN monitor's probe, never the SSL loss)."""
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:6]
    items = [{"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": p.name[:-7]}
             for p in images]  # fmt: skip
    path = tmp_path_factory.mktemp("pool") / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path


@pytest.fixture(scope="module")
def straight(pool: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: its result, MLflow metric histories and ``metrics.jsonl``."""
    tmp = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    res = run_script(tmp, config(pool, tmp / "run", uri))
    return {"res": res, "hist": histories(uri, res["run_id"]), "lines": lines(tmp / "run")}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("flush", "kill_at"),
    [("0", 7), ("default", 7), ("0", 3)],
    ids=["sent-at-once", "buffered", "before-first-checkpoint"],
)
def test_sigkilled_pretraining_resumes_logging_each_step_once(
    pool: Path, straight: dict[str, Any], tmp_path: Path, flush: str, kill_at: int
) -> None:
    """``sent-at-once``: every record reached MLflow before the kill (steps that outlast the tracker's flush
    interval), so a resume that re-sent the redone steps 5–7 (the step-6 kNN probe too) would double them.
    ``buffered``: the tracker's default 5-s flush; what was still queued at the kill is lost with the process:
    the steps after the checkpoint are sent by the resume, those before it must have been made durable before
    ``last.pt``. ``before-first-checkpoint``: killed at step 3, no ``last.pt``: the restart redoes the run from
    step 0 in the same MLflow run (the folder's ledger names it) and sends only steps 4 onwards."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg, run = config(pool, tmp_path / "run", uri), tmp_path / "run"
    run_script(tmp_path, cfg, kill_at=kill_at, flush=flush)
    client = make_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("pt-crash").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"  # killed: nothing closed it
    run_id = runs[0].info.run_id
    last = run / "checkpoints" / "last.pt"
    if kill_at > CKPT_EVERY:
        assert load_checkpoint(last)["step"] == CKPT_EVERY < kill_at  # steps 5–7 were logged after it
    else:
        assert not last.exists()
    assert max(x["step"] for x in lines(run)) == kill_at  # metrics.jsonl has the steps past the checkpoint
    ledger = json.loads((run / LEDGER).read_text()) if (run / LEDGER).exists() else None

    res = run_script(tmp_path, cfg, flush=flush)  # what the requeued job runs

    assert res["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    hist = histories(uri, run_id)
    for key, rows in hist.items():
        steps = [s for s, _ in rows]
        assert len(steps) == len(set(steps)), (key, steps)  # each step once
    assert sorted(hist) == sorted(straight["hist"])  # no key lost
    assert comparable(hist) == comparable(straight["hist"])  # every step and value of the uninterrupted run
    assert [s for s, _ in hist["loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in hist["monitor/knn_acc"]] == [0, 3, 6, 9]
    assert lines(run) == straight["lines"]  # metrics.jsonl: the redone steps once, same values
    assert res["losses"] == straight["res"]["losses"][CKPT_EVERY if kill_at > CKPT_EVERY else 0:]
    # the ledger as the kill left it: what had reached MLflow, never less than what precedes last.pt
    assert ledger is not None and ledger["run_id"] == run_id
    assert ledger["logged"]["loss"] >= (CKPT_EVERY if kill_at > CKPT_EVERY else 0)
    if flush == "0":
        assert ledger["logged"]["loss"] == kill_at and ledger["logged"]["monitor/knn_acc"] == kill_at // 3 * 3
