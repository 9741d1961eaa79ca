"""The pretraining MLflow ledger in process, on the toy volumes (the SIGKILL versions on real volumes:
``test_crash_resume_logging.py``): ``CHECKPOINT_SAVING`` comes before the checkpoint file with the tracker's queue made
durable and ``metrics.jsonl`` complete; a run resumed from an earlier checkpoint of the same MLflow run sends no step
the run already holds; a torn ``metrics.jsonl`` line does not stop a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medssl.engines.pretrain import (
    CheckpointSaver,
    MetricsWriter,
    MlflowLogger,
    PretrainHandler,
    run_pretraining,
)
from medssl.engines.pretrain.state import truncate_metrics_log
from medssl.tracking.mlflow_tracker import make_client
from tests.engines.conftest import toy_config

LEDGER_FILE = "checkpoints/mlflow.json"  # spelled out: these tests also run against code before the ledger


class QueueProbe(PretrainHandler):
    """At ``CHECKPOINT_SAVING``: the step, whether its checkpoint file exists yet, the MLflow logger's queued
    records, the ledger's last loss step and the steps ``metrics.jsonl`` holds."""

    def __init__(self, logger: MlflowLogger) -> None:
        self.logger, self.seen, self.saved = logger, [], []

    def checkpoint_saving(self, trainer: Any) -> None:
        it, out = trainer.state.iteration, trainer.out
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        self.seen.append((it, (out / "checkpoints" / f"step_{it:07d}.pt").exists(), len(self.logger.tracker._queue),
                          self.logger.ledger.logged.get("loss"), steps))  # fmt: skip

    def checkpoint_saved(self, trainer: Any) -> None:
        self.saved.append(trainer.state.checkpoint.name)


def test_checkpoint_saving_comes_first_with_everything_durable(tiny_datalist: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=4, checkpoint_every=2, experiment="saving",
                     tracking_uri=uri)  # the tracker's default 5-s flush: steps are queued between checkpoints
    logger = MlflowLogger()
    probe = QueueProbe(logger)
    res = run_pretraining(cfg, progress=False, handlers=[MetricsWriter(), logger, probe, CheckpointSaver()])
    # before each checkpoint file: nothing left in the queue, the ledger at that step, metrics.jsonl up to it
    assert probe.seen == [(2, False, 0, 2, [1, 2]), (4, False, 0, 4, [1, 2, 3, 4])]
    assert probe.saved == ["step_0000002.pt", "step_0000004.pt"]
    ledger = json.loads((res.out_dir / LEDGER_FILE).read_text())
    assert ledger["run_id"] == res.run_id and ledger["logged"]["loss"] == 4 and ledger["config_key"]


def test_resume_from_an_earlier_checkpoint_sends_each_step_once(tiny_datalist: Path, tmp_path: Path) -> None:
    """The run logged steps 1–4; resumed from its step-2 checkpoint (as after a kill past it), it redoes 3 and 4
    with the same values: MLflow keeps one row per step (before the ledger: 3 and 4 twice)."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=4, checkpoint_every=2, keep_checkpoints=2,
                     experiment="resume", tracking_uri=uri)  # fmt: skip
    first = run_pretraining(cfg, progress=False)
    again = run_pretraining(cfg, resume=tmp_path / "run" / "checkpoints" / "step_0000002.pt", progress=False)
    assert again.run_id == first.run_id and again.loss_history == first.loss_history[2:]
    client = make_client(uri)
    for key in ("loss", "lr", "grad_norm"):
        assert [m.step for m in client.get_metric_history(first.run_id, key)] == [1, 2, 3, 4], key
    assert [m.step for m in client.get_metric_history(first.run_id, "skipped_volumes")] == [4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # truncated to step 2, then 3 and 4 again


def test_fresh_run_starts_metrics_anew_and_a_torn_line_is_dropped(tiny_datalist: Path, tmp_path: Path) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    run_pretraining(cfg, progress=False)  # no resume: a new run, not appended to the old lines
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0
    path = tmp_path / "torn.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # killed mid-write
    truncate_metrics_log(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
    truncate_metrics_log(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'
