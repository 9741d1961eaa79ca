"""The pretraining loop's handlers (medssl/engines/pretrain/events.py, handlers.py): the default list given
explicitly equals the CLI's implicit one bit for bit; a user handler sees every event in order with the step's
losses; dropping handlers drops exactly their outputs; skipped steps, errors and MONAI's own StatsHandler."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from medssl.engines.pretrain import (
    AugmentPreview,
    CheckpointSaver,
    Events,
    KnnMonitor,
    MetricsWriter,
    MlflowLogger,
    PretrainHandler,
    RichProgress,
    StatsLogger,
    default_handlers,
    run_pretraining,
)
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.errors import MedsslError
from tests.engines.conftest import toy_config


class Recorder(PretrainHandler):
    """Records ``(event, iteration, output, metrics keys)`` of every event it gets."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    def _add(self, event: str, trainer: Any, extra: Any = None) -> None:
        s = trainer.state
        self.events.append((event, s.iteration, extra))

    def started(self, trainer: Any) -> None:
        self._add("started", trainer, (trainer.state.resumed, trainer.state.epoch_length, trainer.state.max_epochs))

    def iteration_completed(self, trainer: Any) -> None:
        out = trainer.state.output
        self._add("iteration_completed", trainer, None if out is None else (dict(out), trainer.state.epoch))

    def iteration_skipped(self, trainer: Any) -> None:
        self._add("iteration_skipped", trainer)

    def checkpoint_saved(self, trainer: Any) -> None:
        self._add("checkpoint_saved", trainer, trainer.state.checkpoint.name)

    def completed(self, trainer: Any) -> None:
        self._add("completed", trainer, [(p.name, d) for p, d in trainer.state.artifacts])

    def exception_raised(self, trainer: Any, error: BaseException) -> None:
        self._add("exception_raised", trainer, type(error).__name__)


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_explicit_default_handlers_equal_the_cli_run(tiny_datalist: Path, tmp_path: Path) -> None:
    common = dict(total_steps=4, checkpoint_every=2, keep_checkpoints=2, method_kwargs={"dropout": 0.2})
    cli = run_pretraining(toy_config(tiny_datalist, tmp_path / "cli", **common), progress=False)
    listed = [AugmentPreview(enabled=False), KnnMonitor(every=0), MetricsWriter(), MlflowLogger(),
              RichProgress(enabled=False), CheckpointSaver(save_every=2, keep=2)]
    explicit = run_pretraining(toy_config(tiny_datalist, tmp_path / "explicit", **common), progress=False,
                               handlers=listed)
    assert explicit.loss_history == cli.loss_history and len(cli.loss_history) == 4
    assert [p.name for p in explicit.checkpoints] == [p.name for p in cli.checkpoints] == ["step_0000002.pt",
                                                                                           "step_0000004.pt"]
    a, b = load_checkpoint(cli.last_checkpoint), load_checkpoint(explicit.last_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["rng"]["torch"].equal(b["rng"]["torch"]) and a["data"] == b["data"]
    assert _lines(cli.out_dir) == _lines(explicit.out_dir)
    assert [type(h).__name__ for h in default_handlers()] == [type(h).__name__ for h in listed]


def test_user_handler_sees_every_event_in_order_and_resume(tiny_datalist: Path, tmp_path: Path) -> None:
    rec = Recorder()
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=4, checkpoint_every=3)
    res = run_pretraining(cfg, progress=False, handlers=[*default_handlers(progress=False), rec])
    names = [e[0] for e in rec.events]
    # CHECKPOINT_SAVED fires when the saver (listed before the recorder) writes, inside ITERATION_COMPLETED
    assert names == ["started", "iteration_completed", "iteration_completed", "checkpoint_saved",
                     "iteration_completed", "checkpoint_saved", "iteration_completed", "completed"]
    assert rec.events[0] == ("started", 0, (False, 3, 2))  # 6 volumes / batch 2 = 3 steps per epoch
    steps = [(it, out[0]["loss"], out[1]) for ev, it, out in rec.events if ev == "iteration_completed"]
    assert [(s, loss) for s, loss, _ in steps] == res.loss_history  # every step with its loss, as trained
    assert [e for _, _, e in steps] == [1, 1, 1, 2]
    assert all({"loss", "lr", "grad_norm"} <= set(out[0]) for ev, _, out in rec.events if ev == "iteration_completed")
    assert [e[2] for e in rec.events if e[0] == "checkpoint_saved"] == ["step_0000003.pt", "step_0000004.pt"]
    assert rec.events[-1][2] == [("encoder.pt", "encoder"), ("encoder.json", "encoder"), ("config.yaml", None)]
    # resumed: STARTED at the checkpoint's step, then only the remaining steps
    again = Recorder()
    more = run_pretraining(cfg.replace(total_steps=5), resume=res.last_checkpoint, progress=False,
                           handlers=[*default_handlers(progress=False), again])
    assert again.events[0] == ("started", 4, (True, 3, 2))
    assert [it for ev, it, _ in again.events if ev == "iteration_completed"] == [5] == [s for s, _ in more.loss_history]


def test_a_short_list_drops_exactly_what_it_omits(tiny_datalist: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=3, checkpoint_every=1, experiment="drop",
                     tracking_uri=uri)
    rec = Recorder()
    res = run_pretraining(cfg, progress=False, handlers=[rec])  # no saver, no metrics.jsonl, no MLflow
    assert [s for s, _ in res.loss_history] == [1, 2, 3] and res.encoder_path.exists()
    assert not (res.out_dir / "metrics.jsonl").exists() and not (res.out_dir / "checkpoints").exists()
    assert res.last_checkpoint is None and res.run_id is None
    assert "checkpoint_saved" not in [e[0] for e in rec.events]
    assert MlflowClient(uri).get_experiment_by_name("drop") is None  # nothing tracked
    # the saver alone: checkpoints without MLflow (no run id in them)
    saved = run_pretraining(cfg.replace(out_dir=str(tmp_path / "saved")), progress=False,
                            handlers=[CheckpointSaver(save_every=0)])
    assert [p.name for p in saved.checkpoints] == ["step_0000003.pt"]  # 0 = only the last
    assert load_checkpoint(saved.last_checkpoint)["mlflow_run_id"] is None


def test_skipped_steps_and_abort_reach_the_handlers(tiny_datalist: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    rec = Recorder()
    cfg = toy_config(tiny_datalist, tmp_path / "nan", total_steps=8, max_nan_steps=2, experiment="nan",
                     tracking_uri=uri, method_kwargs={"nan_calls": [1, 3, 4]})
    with pytest.raises(MedsslError, match="2 consecutive steps had a non-finite loss"):
        run_pretraining(cfg, progress=False, handlers=[*default_handlers(progress=False), rec])
    assert [e[:2] for e in rec.events if e[0] != "started"] == [
        ("iteration_completed", 1), ("iteration_skipped", 2), ("iteration_completed", 2),
        ("iteration_completed", 3), ("iteration_skipped", 4), ("iteration_completed", 4), ("iteration_skipped", 5),
        ("exception_raised", 5)]  # the 2nd skip in a row aborts inside step 5: it never completes
    assert rec.events[2][2] is None and rec.events[-1][2] == "MedsslError"  # a skipped step has no output
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["medssl.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "skipped_nonfinite")] == [2, 4, 5]
    assert [x["step"] for x in _lines(tmp_path / "nan")] == [1, 3]  # skipped steps write no line


class _Boom(PretrainHandler):
    def iteration_completed(self, trainer: Any) -> None:
        if trainer.state.iteration == 2:
            raise RuntimeError("boom at 2")


def test_monai_stats_handler_as_is_and_a_failing_handler(tiny_datalist: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """MONAI's StatsHandler reads only `engine.state`: listed as is it logs every step; when a handler fails, its
    exception_raised re-raises, yet the MLflow run and metrics.jsonl after it are still closed."""
    from mlflow import MlflowClient
    from monai.handlers import StatsHandler

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(tiny_datalist, tmp_path / "boom", total_steps=4, experiment="boom", tracking_uri=uri)
    stats = StatsHandler(output_transform=lambda out: out, name="monai.stats.test")  # MONAI's logger: no propagation
    stats.logger.addHandler(caplog.handler)
    metrics = MetricsWriter()
    try:
        with pytest.raises(RuntimeError, match="boom at 2"):
            run_pretraining(cfg, progress=False, handlers=[stats, metrics, MlflowLogger(), _Boom()])
    finally:
        stats.logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "monai.stats.test"]
    assert lines[0].startswith("Epoch: 1/2, Iter: 1/3 -- ") and "loss: " in lines[0] and "lr: " in lines[0]
    assert sum(x.startswith("Epoch: ") for x in lines) == 2
    assert metrics.file is None and [x["step"] for x in _lines(tmp_path / "boom")] == [1, 2]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("boom").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["medssl.error"] == "RuntimeError: boom at 2"


def test_stats_logger_every_n_steps(tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medssl.engines.pretrain.stats"):
        run_pretraining(toy_config(tiny_datalist, tmp_path / "s", total_steps=4), progress=False,
                        handlers=[StatsLogger(every=2)])
    lines = [r.getMessage() for r in caplog.records if r.name == "medssl.engines.pretrain.stats"]
    assert [x.split(" --")[0] for x in lines] == ["Epoch: 1/2, Iter: 2/3", "Epoch: 2/2, Iter: 1/3"]


@pytest.mark.parametrize(("handlers", "words"), [
    ([None], "handlers[0] (None) is not a pretraining handler"),
    ([MetricsWriter(), CheckpointSaver], "handlers[1] (<class"),
    ([torch.nn.Identity()], "handlers[0] (Identity()) is not a pretraining handler"),
    (MetricsWriter(), "handlers must be a list"),
])
def test_a_non_handler_is_refused_before_training(tiny_datalist: Path, tmp_path: Path, handlers: Any,
                                                  words: str) -> None:
    with pytest.raises(MedsslError) as e:
        run_pretraining(toy_config(tiny_datalist, tmp_path / "x", total_steps=1), progress=False, handlers=handlers)
    assert words in str(e.value) and "\n" not in str(e.value)
    if "must be a list" not in words:
        assert "started, iteration_completed" in str(e.value)
    assert not (tmp_path / "x" / "config.yaml").exists()


def test_events_are_ignite_names() -> None:
    from ignite.engine import Events as IgniteEvents

    ours = {e.name for e in Events}
    assert {"STARTED", "ITERATION_COMPLETED", "COMPLETED", "EXCEPTION_RAISED"} <= ours & {e.name for e in IgniteEvents}
    assert all(e.value == e.name.lower() for e in Events)  # the handler method called
