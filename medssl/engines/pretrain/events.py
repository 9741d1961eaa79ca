"""The pretraining loop's events and the state its handlers read, named after Ignite's (``ignite.engine.Events``,
``engine.state``) so a MONAI user recognises them.

A handler is any object with some of the methods below, each named after its event's value (what Ignite's
``engine.add_event_handler(Events.X, handler.x)`` wires by hand): the
:class:`~medssl.engines.pretrain.engine.Pretrainer` calls ``handler.<event>(trainer)`` on each handler in list
order, on every DDP rank (a handler that writes files or tracks checks ``trainer.dist.is_main``). Handlers read
``trainer.state`` (:class:`PretrainState`) and the trainer's parts (``cfg``, ``out``, ``pool``, ``encoder``,
``checkpointer``, ``result``, ``dist``, ``device``). One MONAI handler works as is:
``monai.handlers.StatsHandler`` only reads ``engine.state`` (:class:`~medssl.engines.pretrain.handlers.StatsLogger`
wraps it); handlers that need an Ignite ``Engine`` (``attach``, ``engine.terminate``, Ignite's ``Checkpoint``) do not.

Order matters as in Ignite: a handler that adds to ``state.metrics`` (the kNN monitor) must come before the
loggers that write them; the checkpoint saver comes after the loggers, so a step's metrics are written before
its checkpoint (a crash between the two redoes the step on resume instead of losing its line).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["Events", "PretrainState", "PretrainHandler", "EVENT_METHODS", "check_handlers", "fire", "fire_exception"]

log = logging.getLogger(__name__)


class Events(str, Enum):
    """Events of a pretraining run; the value is the handler method called.

    - ``STARTED`` (Ignite's): after the resume, before the first step; ``state.iteration`` is the step the run
      continues from (0 when fresh). Step-0 metrics (the untrained encoder's kNN probe) go in ``state.metrics``.
    - ``ITERATION_COMPLETED`` (Ignite's): after every optimizer step; ``state.output`` holds its logs
      (``{"loss", "lr", <method logs>, "grad_norm"?}``, floats averaged over ranks), ``None`` for a step skipped
      on a non-finite loss; handlers before a logger may add to ``state.metrics``.
    - ``ITERATION_SKIPPED`` (medssl's, like an Ignite custom event): a step skipped on a non-finite loss, fired
      before the run checks whether too many were skipped in a row (the last one is reported too).
    - ``CHECKPOINT_SAVING`` (medssl's): a checkpoint of ``state.iteration`` is about to be written, by the saver
      or on preemption: what a resume from it will not redo is made durable now (the MLflow logger sends or spools
      its queue, ``metrics.jsonl`` is fsynced).
    - ``CHECKPOINT_SAVED`` (medssl's): a checkpoint was written (``state.checkpoint``), by the saver or on
      preemption.
    - ``COMPLETED`` (Ignite's): ``total_steps`` reached and the encoder written; ``state.artifacts`` lists the
      run's output files, ``state.metrics`` its end-of-run numbers (``skipped_volumes``).
    - ``EXCEPTION_RAISED`` (Ignite's): called as ``handler.exception_raised(trainer, error)`` on any error,
      preemption (``Preempted``) and ``KeyboardInterrupt`` included; the error is raised again afterwards.
    """

    STARTED = "started"
    ITERATION_COMPLETED = "iteration_completed"
    ITERATION_SKIPPED = "iteration_skipped"
    CHECKPOINT_SAVING = "checkpoint_saving"
    CHECKPOINT_SAVED = "checkpoint_saved"
    COMPLETED = "completed"
    EXCEPTION_RAISED = "exception_raised"


#: the handler method names, one per event
EVENT_METHODS = tuple(e.value for e in Events)


@dataclass
class PretrainState:
    """What handlers read at an event (``trainer.state``); Ignite's names where Ignite has the field.

    Attributes:
        iteration: optimizer steps done (1-based at ``ITERATION_COMPLETED``; skipped steps count).
        max_iterations: the run's ``total_steps``.
        epoch_length: optimizer steps per pass over the pool (global batch ``B × accum × ranks``).
        output: the logs of the step just run (``ITERATION_COMPLETED``), ``None`` when skipped.
        metrics: numbers produced at this event for the loggers (monitor scores, end-of-run counts); cleared
            before ``STARTED``, each ``ITERATION_COMPLETED`` and ``COMPLETED``.
        params: run parameters produced at this event for the trackers (``monitor.*``); cleared alike.
        artifacts: ``(file, folder in the tracker or None)`` produced at this event (preview PNG, encoder);
            cleared alike.
        resumed: the run continues a checkpoint.
        resumed_run_id: that checkpoint's MLflow run id (a tracker continues it); with ``resume="auto"`` and no
            checkpoint yet, the run the folder's ledger names for the same config (``checkpoints/mlflow.json``:
            an attempt interrupted before its first checkpoint), continued from step 0.
        run_id: the MLflow run this process logs into (set by the MLflow handler), stored in checkpoints.
        checkpoint: the last checkpoint written (``CHECKPOINT_SAVED``).
    """

    iteration: int = 0
    max_iterations: int = 0
    epoch_length: int = 1
    output: dict[str, float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    resumed: bool = False
    resumed_run_id: str | None = None
    run_id: str | None = None
    checkpoint: Path | None = None

    @property
    def epoch(self) -> int:
        """Ignite's 1-based epoch of ``iteration`` (0 before the first step)."""
        return 0 if self.iteration <= 0 else (self.iteration - 1) // max(1, self.epoch_length) + 1

    @property
    def max_epochs(self) -> int:
        """Epochs of the whole run (``ceil(max_iterations / epoch_length)``)."""
        return math.ceil(self.max_iterations / max(1, self.epoch_length))

    def clear_outputs(self) -> None:
        """Empty ``metrics``, ``params`` and ``artifacts`` (before an event whose handlers produce them)."""
        self.metrics, self.params, self.artifacts = {}, {}, []


class PretrainHandler:
    """Base class of pretraining handlers: every event method does nothing, so a subclass defines only the
    ones it needs (subclassing is optional: any object with some of these methods is a handler).

    Example (a bundle ``handlers:`` entry ``{_target_: my_pkg.LossPrinter}``)::

        class LossPrinter(PretrainHandler):
            def iteration_completed(self, trainer):
                if trainer.state.output is not None:
                    logging.getLogger("my_pkg").info("%d %.4f", trainer.state.iteration, trainer.state.output["loss"])
    """

    def started(self, trainer: Any) -> None:
        """``Events.STARTED``."""

    def iteration_completed(self, trainer: Any) -> None:
        """``Events.ITERATION_COMPLETED``."""

    def iteration_skipped(self, trainer: Any) -> None:
        """``Events.ITERATION_SKIPPED``."""

    def checkpoint_saving(self, trainer: Any) -> None:
        """``Events.CHECKPOINT_SAVING``."""

    def checkpoint_saved(self, trainer: Any) -> None:
        """``Events.CHECKPOINT_SAVED``."""

    def completed(self, trainer: Any) -> None:
        """``Events.COMPLETED``."""

    def exception_raised(self, trainer: Any, error: BaseException) -> None:
        """``Events.EXCEPTION_RAISED``."""


def check_handlers(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` as a list, each checked to have at least one event method (:data:`EVENT_METHODS`).

    Raises:
        MedsslError: an entry that is not a handler (e.g. ``None``, a class instead of an instance), naming its
            position and the methods looked for.
    """
    if isinstance(handlers, (str, bytes)) or not isinstance(handlers, Sequence):
        raise MedsslError(f"handlers must be a list of handler objects, got {type(handlers).__name__}")
    for i, h in enumerate(handlers):
        if isinstance(h, type) or not any(callable(getattr(h, m, None)) for m in EVENT_METHODS):
            raise MedsslError(f"handlers[{i}] ({h!r}) is not a pretraining handler: it needs one of the methods "
                              f"{', '.join(EVENT_METHODS)} (medssl.engines.pretrain.events)")
    return list(handlers)


def fire(handlers: Sequence[Any], event: Events, trainer: Any) -> None:
    """Call ``handler.<event.value>(trainer)`` on every handler that has it, in list order (like Ignite's
    ``engine.fire_event``). ``EXCEPTION_RAISED`` goes through :func:`fire_exception`."""
    for handler in handlers:
        method = getattr(handler, event.value, None)
        if method is not None:
            method(trainer)


def fire_exception(handlers: Sequence[Any], trainer: Any, error: BaseException) -> None:
    """``handler.exception_raised(trainer, error)`` on every handler; a handler that fails (or raises ``error``
    again, as MONAI's ``StatsHandler`` does) does not keep the others from closing their files and runs."""
    for handler in handlers:
        method = getattr(handler, Events.EXCEPTION_RAISED.value, None)
        try:
            if method is not None:
                method(trainer, error)
        except BaseException as e:  # noqa: BLE001 - the caller raises the original error
            if e is not error:
                log.warning("handler %s failed on exception_raised: %s", type(handler).__name__, e)
