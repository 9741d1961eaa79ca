"""The pretraining run's default handlers (events: :mod:`medssl.engines.pretrain.events`), each constructible from
plain arguments so a bundle lists them as ``_target_`` entries and a user swaps, removes or adds one in YAML.

``medssl pretrain`` runs :func:`default_handlers`, in this order: :class:`AugmentPreview` (PNG of the views),
:class:`KnnMonitor` (kNN probe scores into ``state.metrics``), :class:`MetricsWriter` (``metrics.jsonl``),
:class:`MlflowLogger` (the MLflow run), :class:`RichProgress` (progress bar) and :class:`CheckpointSaver`
(exact-resume checkpoints). An argument left ``None`` takes the run config's value (``preview``,
``monitor_every``, ``experiment``, ``checkpoint_every`` …), so the CLI's config and a bundle's handler list
describe the same run. :class:`StatsLogger` (log lines through MONAI's ``StatsHandler``) is the bundle's extra.

Which of MONAI's handlers fit: ``StatsHandler`` only reads ``engine.state`` and keeps no state, so it is used
as is (:class:`StatsLogger`). ``CheckpointSaver`` / ``CheckpointLoader`` (Ignite's ``Checkpoint``) save the
``to_save`` objects but not the data position inside an epoch nor the augmentation's and the RNGs' states: a
resume is not exact (``tests/engines/pretrain/test_monai_resume_gap.py``), hence :class:`CheckpointSaver` over
:class:`~medssl.engines.pretrain.state.PretrainCheckpointer`. ``MLFlowHandler`` starts and ends its own run per
engine run: a resumed run would not continue the checkpoint's run id, and it has neither medssl's outage spool
nor the standard tags ``medssl compare`` selects runs by, hence :class:`MlflowLogger` over ``MlflowTracker``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from medssl.engines.pretrain.events import PretrainHandler
from medssl.engines.runtime.ledger import LEDGER_FILE, MetricLedger, close_tracker, config_key

__all__ = [
    "AugmentPreview",
    "KnnMonitor",
    "MetricsWriter",
    "StatsLogger",
    "MlflowLogger",
    "RichProgress",
    "CheckpointSaver",
    "default_handlers",
]

log = logging.getLogger(__name__)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


class AugmentPreview(PretrainHandler):
    """At ``STARTED`` of a fresh run (rank 0): a PNG of 4 samples' views (:mod:`medssl.engines.pretrain.preview`;
    RNG and augmentation state restored, so training is unchanged), added to ``state.artifacts``.

    Args:
        enabled: write it; ``None``: the config's ``preview``.
        filename: the PNG's name in the run folder.
    """

    def __init__(self, enabled: bool | None = None, filename: str = "augment_preview.png") -> None:
        self.enabled, self.filename = enabled, filename

    def started(self, trainer: Any) -> None:
        if not (_pick(self.enabled, trainer.cfg.preview) and trainer.dist.is_main and not trainer.state.resumed):
            return
        from medssl.engines.pretrain.preview import augment_preview

        cfg = trainer.cfg
        png = augment_preview(trainer.dataset, trainer.batcher, trainer.augment, cfg.source_size, cfg.seed,
                              trainer.device, trainer.out / self.filename)
        if png is not None:
            trainer.state.artifacts.append((png, None))


class KnnMonitor(PretrainHandler):
    """The representation monitor (:mod:`medssl.engines.pretrain.monitor`) on rank 0: a leave-one-case-out kNN
    probe of the encoder on labelled pool cases at step 0 (fresh runs) and every ``every`` completed steps; its
    scores (``monitor/knn_acc``, ``monitor/knn_balanced_acc``, ``monitor/seconds``) go into ``state.metrics`` and
    ``result.monitor_history``, its description into ``state.params`` (``monitor.*``). RNG states are restored:
    training and exact resume are unchanged. List it before the loggers.

    Args:
        every: steps between probes, 0 = off; ``None``: the config's ``monitor_every``.
        cases: at most this many probe cases (≥ 2); ``None``: ``monitor_cases``.
        k: neighbours; ``None``: ``monitor_k``.
    """

    def __init__(self, every: int | None = None, cases: int | None = None, k: int | None = None) -> None:
        self.every, self.cases, self.k = every, cases, k
        self.monitor: Any = None

    def started(self, trainer: Any) -> None:
        self.monitor, self._every = None, int(_pick(self.every, trainer.cfg.monitor_every))
        if not (self._every and trainer.dist.is_main):  # rank 0 alone probes (plain encoder, no collectives)
            return
        from medssl.engines.pretrain.monitor import build_monitor

        given = {k: v for k, v in (("monitor_cases", self.cases), ("monitor_k", self.k)) if v is not None}
        self.monitor = build_monitor(trainer.cfg.replace(**given), trainer.pool, trainer.device)
        if self.monitor is not None and not trainer.state.resumed:
            trainer.state.params.update({f"monitor.{k}": v for k, v in self.monitor.describe().items()})
            trainer.state.metrics.update(self._evaluate(trainer))  # step 0: the untrained encoder's baseline

    def iteration_completed(self, trainer: Any) -> None:
        s = trainer.state
        if self.monitor is not None and s.output is not None and s.iteration % self._every == 0:
            s.metrics.update(self._evaluate(trainer))

    def _evaluate(self, trainer: Any) -> dict[str, float]:
        scores = self.monitor.evaluate(trainer.encoder)
        trainer.result.monitor_history.append((trainer.state.iteration, scores))
        log.info("step %d: monitor kNN accuracy %.3f, balanced %.3f (%.1f s)", trainer.state.iteration,
                 scores["monitor/knn_acc"], scores["monitor/knn_balanced_acc"], scores["monitor/seconds"])
        return scores


class MetricsWriter(PretrainHandler):
    """``metrics.jsonl`` (rank 0): one JSON line per completed step, ``{"step", **output, **metrics}``, and a
    step-0 line when ``STARTED`` brings metrics; flushed per line, fsynced before every checkpoint. On resume the
    lines after the checkpoint's step (written before a crash, redone now) are dropped first
    (:func:`~medssl.engines.pretrain.state.truncate_metrics_log`); a fresh run starts the file anew (a restart of
    a run stopped before its first checkpoint redoes its steps from 1).

    Args:
        filename: the file's name in the run folder.
    """

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename, self.file = filename, None

    def started(self, trainer: Any) -> None:
        self.file = None
        if not trainer.dist.is_main:
            return
        from medssl.engines.pretrain.state import truncate_metrics_log

        path, s = trainer.out / self.filename, trainer.state
        if s.resumed:
            truncate_metrics_log(path, s.iteration)
        self.file = open(path, "a" if s.resumed else "w")  # noqa: SIM115 - closed at completed / exception_raised
        if s.metrics:
            self._write({"step": s.iteration, **s.metrics})

    def iteration_completed(self, trainer: Any) -> None:
        s = trainer.state
        if self.file is not None and s.output is not None:
            self._write({"step": s.iteration, **s.output, **s.metrics})

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def checkpoint_saving(self, trainer: Any) -> None:
        if self.file is not None:  # the lines up to the checkpoint's step survive a node failure after it
            os.fsync(self.file.fileno())

    def completed(self, trainer: Any) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def exception_raised(self, trainer: Any, error: BaseException) -> None:
        self.completed(trainer)


class StatsLogger(PretrainHandler):
    """A log line of the step's output every ``every`` completed steps (rank 0), written by MONAI's
    ``StatsHandler`` (``"Epoch: 1/3, Iter: 2/5 -- grad_norm: 0.81 loss: 4.12 lr: 0.0003"``) from
    ``trainer.state`` (Ignite's ``output``, ``iteration``, ``epoch``, ``epoch_length``, ``max_epochs``). Its
    ``attach`` (Ignite event registration and filters) is not used: this wrapper calls it every N steps.

    Args:
        every: steps between lines (0 = none).
        name: the ``logging`` logger written to.
    """

    def __init__(self, every: int = 10, name: str = "medssl.engines.pretrain.stats") -> None:
        from monai.handlers import StatsHandler

        self.every = int(every)
        self.stats = StatsHandler(iteration_log=False, epoch_log=False, output_transform=lambda out: out)
        # MONAI's get_logger(name) would stop `name` propagating and add a stdout handler to it; medssl keeps stdout
        # for results and logs through its own handlers, so the lines go to a plain logger instead
        self.stats.logger = logging.getLogger(name)

    def iteration_completed(self, trainer: Any) -> None:
        s = trainer.state
        if self.every and trainer.dist.is_main and s.output is not None and s.iteration % self.every == 0:
            self.stats.iteration_completed(trainer)


class MlflowLogger(PretrainHandler):
    """The run's MLflow run (rank 0; :class:`~medssl.tracking.mlflow_tracker.MlflowTracker`: standard tags,
    outage spool): started at ``STARTED`` (a fresh run logs the flat config and ``state.params``; a resumed one
    continues ``state.resumed_run_id``), then ``state.artifacts`` and ``state.metrics`` of every event, the step's
    output every ``log_every`` steps, ``skipped_nonfinite`` per skipped step, ``compile_first_step_s``; closed
    FINISHED at ``COMPLETED``, KILLED on preemption (tag ``medssl.preempted``) or interrupt, FAILED on an error
    (tag ``medssl.error``). Without an experiment (config ``experiment: null``) it logs nothing.

    Each metric step reaches the run once, however the run stopped (preemption, crash, ``kill -9``): the
    :class:`~medssl.engines.runtime.ledger.MetricLedger` ``checkpoints/mlflow.json`` records per key the last step
    sent or spooled (the tracker's ``on_durable``), a resumed run does not send the steps it redoes again, and at
    ``CHECKPOINT_SAVING`` the queue is made durable (``MlflowTracker.persist``), so no record from before the
    checkpoint dies with the process.

    Args:
        experiment: the MLflow experiment; ``None``: the config's ``experiment``.
        tracking_uri: ``None``: the config's (else ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``).
        run_name: ``None``: the config's (else the run folder's name).
        log_every: steps between logged outputs; ``None``: the config's ``log_every``.
    """

    def __init__(self, experiment: str | None = None, tracking_uri: str | None = None, run_name: str | None = None,
                 log_every: int | None = None) -> None:
        self.experiment, self.tracking_uri, self.run_name, self.log_every = experiment, tracking_uri, run_name, log_every
        self.tracker: Any = None
        self.ledger: MetricLedger | None = None

    def started(self, trainer: Any) -> None:
        self.tracker, self.ledger, self._compile_logged = None, None, False
        if not trainer.dist.is_main:  # other ranks never track (one MLflow run per training, not per process)
            return
        from medssl.engines.pretrain.outputs import start_tracking

        given = {"experiment": self.experiment, "tracking_uri": self.tracking_uri, "run_name": self.run_name}
        cfg = trainer.cfg.replace(**{k: v for k, v in given.items() if v is not None})
        self._every, s = max(1, int(_pick(self.log_every, cfg.log_every))), trainer.state
        self.tracker = start_tracking(cfg, trainer.pool, trainer.out, run_id=s.resumed_run_id, fresh=not s.resumed)
        if self.tracker is None:
            return
        s.run_id = trainer.result.run_id = self.tracker.run_id
        self.ledger = MetricLedger(trainer.out / LEDGER_FILE, self.tracker.run_id, config_key=config_key(trainer.cfg))
        self.tracker.on_durable = self.ledger.mark
        self._log_outputs(s)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Send what the run does not hold at ``step`` yet (a resumed run redoes the steps since its checkpoint)."""
        metrics = self.ledger.unlogged(metrics, step) if self.ledger is not None else metrics
        if metrics:
            self.tracker.log_metrics(metrics, step)

    def _log_outputs(self, s: Any) -> None:
        if s.params:
            self.tracker.log_params(s.params)
        for path, folder in s.artifacts:
            self.tracker.log_artifact(path, folder)
        if s.metrics:
            self._log(s.metrics, s.iteration)

    def iteration_completed(self, trainer: Any) -> None:
        if self.tracker is None:
            return
        s = trainer.state
        if trainer.compile_s is not None and not self._compile_logged:
            self._log({"compile_first_step_s": trainer.compile_s}, s.iteration)
            self._compile_logged = True
        if s.output is not None and s.iteration % self._every == 0:
            self._log(s.output, s.iteration)
        if s.metrics:
            self._log(s.metrics, s.iteration)

    def iteration_skipped(self, trainer: Any) -> None:
        if self.tracker is not None:
            self._log({"skipped_nonfinite": 1.0}, trainer.state.iteration)

    def checkpoint_saving(self, trainer: Any) -> None:
        if self.tracker is not None:  # sent, or spooled during an outage: a kill after the checkpoint loses nothing
            self.tracker.persist()

    def completed(self, trainer: Any) -> None:
        if self.tracker is not None:
            self._log_outputs(trainer.state)
            t = trainer.result.timing  # wall times as tags: a resumed run's metric history stays the straight run's
            if t.get("steps"):
                self.tracker.set_tags({"medssl.s_per_step": f"{t['s_per_step']:.4f}",
                                       "medssl.train_minutes": f"{t['train_s'] / 60:.2f}"})
            close_tracker(self.tracker)
            self.tracker = None

    def exception_raised(self, trainer: Any, error: BaseException) -> None:
        # preempted: KILLED until the requeued job reattaches (RUNNING) and finishes it
        close_tracker(self.tracker, error)
        self.tracker = None


class RichProgress(PretrainHandler):
    """A rich progress bar on stderr with the last loss (rank 0; :class:`~medssl.engines.runtime.progress.ProgressBar`).

    Args:
        enabled: show it (``medssl pretrain`` shows it when stderr is a terminal).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.bar, self.update = enabled, None, None

    def started(self, trainer: Any) -> None:
        from medssl.engines.runtime.progress import ProgressBar

        self.bar = ProgressBar(self.enabled and trainer.dist.is_main, trainer.total_steps, trainer.state.iteration)
        self.update = self.bar.__enter__()

    def iteration_completed(self, trainer: Any) -> None:
        if self.update is not None and trainer.state.output is not None:
            self.update(trainer.state.iteration, trainer.state.output["loss"])

    def completed(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = self.update = None

    def exception_raised(self, trainer: Any, error: BaseException) -> None:
        self.completed(trainer)


class CheckpointSaver(PretrainHandler):
    """Exact-resume checkpoints (:meth:`Pretrainer.save_checkpoint`: the one state dict of
    :class:`~medssl.engines.pretrain.state.PretrainCheckpointer`, ``checkpoints/step_XXXXXXX.pt`` + ``last.pt``,
    written by rank 0, every rank taking part under DDP): every ``save_every`` steps and at the last step (or at
    ``COMPLETED`` when a resumed run had nothing left to do). List it after the loggers. A preempted run
    checkpoints without it (the engine's contract with the requeued job).

    Args:
        save_every: steps between checkpoints, 0 = only the last; ``None``: the config's ``checkpoint_every``.
        keep: periodic ``step_*.pt`` files kept; ``None``: the config's ``keep_checkpoints``.
    """

    def __init__(self, save_every: int | None = None, keep: int | None = None) -> None:
        self.save_every, self.keep = save_every, keep

    def started(self, trainer: Any) -> None:
        self._every = int(_pick(self.save_every, trainer.cfg.checkpoint_every))
        if self.keep is not None:
            trainer.checkpointer.keep = max(1, int(self.keep))

    def iteration_completed(self, trainer: Any) -> None:
        s = trainer.state
        if (self._every and s.iteration % self._every == 0) or s.iteration >= s.max_iterations:
            trainer.save_checkpoint()

    def completed(self, trainer: Any) -> None:
        if not trainer.checkpointer.is_written(trainer.state.iteration):
            trainer.save_checkpoint()


def default_handlers(progress: bool = True) -> list[PretrainHandler]:
    """The handlers of ``medssl pretrain``, in order, every setting from the run config.

    Args:
        progress: show the progress bar.
    """
    return [AugmentPreview(), KnnMonitor(), MetricsWriter(), MlflowLogger(), RichProgress(progress), CheckpointSaver()]
