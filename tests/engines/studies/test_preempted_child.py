"""A sweep child preempted before its first ``last.pt`` and re-run (the requeued job) continues its MLflow run: the
study keeps one run per child, every metric step once. Real sweep runner, real finetuning on 6 hippocampus cases."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from medssl.engines.finetune.engine import Finetuner
from medssl.engines.runtime.ledger import LEDGER_FILE
from medssl.engines.runtime.preemption import Preempted
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.compare import find_study_runs
from medssl.tracking.mlflow_tracker import make_client
from tests.engines.studies._helpers import SEG_NET, children, fresh_sqlite_uri, hippocampus_datalist

KEY = "f100-scratch-s0"


def spec(hippocampus_dir: Path, tmp: Path, uri: str) -> dict[str, Any]:
    """4 training cases, batch 2: 2 steps an epoch, 2 epochs; a validation after every step."""
    datalist = hippocampus_datalist(hippocampus_dir, tmp / "data")
    return {
        "study": "preempted-child",
        "experiment": "sweep-preempt",
        "tracking_uri": uri,
        "out_dir": str(tmp / "runs"),
        "data": {"datalist": str(datalist), "test_fraction": 0.2, "val_fraction": 0.2},
        "finetune": {
            "network": "SegResNet", "network_kwargs": SEG_NET, "roi_size": [16] * 3, "max_epochs": 2,
            "batch_size": 2, "val_every_steps": 1, "sw_overlap": 0.0, "sw_batch_size": 8, "device": "cpu",
        },  # fmt: skip
        "fractions": [100],
        "inits": ["scratch"],
        "seeds": [0],
        "metric": "test_dice_mean",
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("found_by", ["folder", "tags"])
def test_child_preempted_before_its_first_checkpoint_keeps_its_run(
    hippocampus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found_by: str
) -> None:
    """``folder``: the child's ``checkpoints/mlflow.json`` names its run. ``tags``: that file is gone (a folder
    of an older medssl): the runner finds the KILLED run by its ``medssl.sweep_key`` tag."""
    uri = fresh_sqlite_uri(tmp_path)
    pipeline = spec(hippocampus_dir, tmp_path, uri)
    real = Finetuner.train_step

    def step_then_signal(self: Finetuner, batch: Any) -> float | None:
        out = real(self, batch)
        if self.step == 1:  # the first validation is logged, then the run stops before step 2 (no last.pt)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Finetuner, "train_step", step_then_signal)
    with pytest.raises(Preempted):
        run_sweep(pipeline, progress=False)
    child_dir = tmp_path / "runs" / "preempted-child" / "sweep" / KEY
    assert not (child_dir / "checkpoints" / "last.pt").exists()
    parent = find_study_runs(make_client(uri), "preempted-child")[0].info.run_id
    (first,) = [r for r in children(uri, parent) if r.data.tags.get("medssl.sweep_key") == KEY]
    assert first.info.status == "KILLED"
    assert [m.step for m in make_client(uri).get_metric_history(first.info.run_id, "val_dice_mean")] == [1]
    if found_by == "tags":
        (child_dir / LEDGER_FILE).unlink()

    monkeypatch.setattr(Finetuner, "train_step", real)
    res = run_sweep(pipeline, progress=False)  # the requeued job

    assert res.parent_run_id == parent and not res.failed
    runs = [r for r in children(uri, parent) if r.data.tags.get("medssl.sweep_key") == KEY]
    assert [r.info.run_id for r in runs] == [first.info.run_id]  # one run for the child, the first one
    assert runs[0].info.status == "FINISHED" and res.children[0].run_id == first.info.run_id
    steps = [m.step for m in make_client(uri).get_metric_history(first.info.run_id, "val_dice_mean")]
    if found_by == "folder":  # the ledger also knew step 1 was logged
        assert steps == [1, 2, 3, 4]
    else:  # without it the redone step 1 is sent again: the run is kept, its first point doubled
        assert sorted(set(steps)) == [1, 2, 3, 4]
    train = [m.step for m in make_client(uri).get_metric_history(first.info.run_id, "train_loss")]
    assert train == [2, 4] and "test_dice_mean" in runs[0].data.metrics

