"""A preempted finetuning run resumes from its epoch-start ``last.pt`` and redoes the steps since then; the
validations it logged inside that epoch before the signal reach MLflow once, not twice (``checkpoints/mlflow.json``,
the ledger of what reached MLflow; the same after a crash: ``test_crash_resume_logging.py``). The SLURM end-to-end
version is ``tests/cluster/test_done_when.py``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from medssl.engines.finetune.engine import Finetuner, run_finetune
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.runtime.preemption import Preempted
from medssl.tracking.mlflow_tracker import make_client
from tests.engines.finetune.test_engine import adrenal, cls_config  # noqa: F401 (fixture)


def test_resumed_run_logs_each_metric_step_once(adrenal, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # 25 %: 6 cases, batch 4 → 2 steps an epoch; a validation after every step (inside the epoch, too)
    cfg = cls_config(adrenal, tmp_path / "pre", fraction=25, max_epochs=3, val_every_steps=1,
                     experiment="ft-preempt", tracking_uri=uri)  # fmt: skip
    real = Finetuner.train_step

    def step_then_signal(self: Finetuner, batch):
        out = real(self, batch)
        if self.step == 3:  # epoch 1's first step: its validation is logged, then the run stops
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Finetuner, "train_step", step_then_signal)
    with pytest.raises(Preempted):
        run_finetune(cfg, progress=False)
    assert load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")["step"] == 2  # step 3 is redone
    client = make_client(uri)
    run_id = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_auc")] == [1, 2, 3]  # 3 sent before the stop
    monkeypatch.setattr(Finetuner, "train_step", real)
    res = run_finetune(cfg, resume="auto", progress=False)  # what the requeued job runs

    assert res.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    history = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")["history"]
    names = {k for h in history for k in h if k not in ("epoch", "step")}
    assert {"val_auc", "train_loss"} <= names
    for name in names:
        remote = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        local = sorted((int(h["step"]), float(h[name])) for h in history if name in h)
        assert [s for s, _ in remote] == [s for s, _ in local], name  # every step once, none lost
        assert [v for _, v in remote] == pytest.approx([v for _, v in local], nan_ok=True), name
    assert [m.step for m in client.get_metric_history(run_id, "val_auc")] == [1, 2, 3, 4, 5, 6]
