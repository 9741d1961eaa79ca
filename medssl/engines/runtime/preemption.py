"""Preemption: SLURM's pre-timeout signal becomes a checkpoint at the next step boundary and a distinctive exit.

A job asks SLURM for a warning signal before its time limit (``#SBATCH --signal=B:USR1@120``: SIGUSR1 to the
batch shell 120 s before the end). The batch script (``docker/slurm/*.sbatch``) traps it and passes it on to
the training process (SIGUSR1 to a plain process; SIGTERM to ``torchrun``/``srun``, which forward it to every
worker). Inside medssl, a :class:`PreemptionHandler` (installed by the engine for the duration of ``fit``)
only *records* the signal; the engine checks :attr:`PreemptionHandler.requested` between optimizer steps,
writes its checkpoint there and raises :class:`Preempted`, which the CLI turns into exit code
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). The batch script then runs ``scontrol requeue
$SLURM_JOB_ID`` and the requeued job resumes from the checkpoint (``--resume auto``) exactly.

Why a flag and not work inside the handler: a Python signal handler runs between two bytecodes, possibly in
the middle of an optimizer step or a ``torch.save``; a checkpoint written there would not be a step boundary.
The only global state is the process's signal disposition itself, restored by :meth:`PreemptionHandler.uninstall`.

Under DDP (``torchrun``) every rank gets the signal, but not necessarily before the same step: the engine asks
:meth:`PreemptionHandler.should_stop` with a collective (any rank signalled → every rank stops after the same
step), so the checkpoint holds one consistent step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from medssl.errors import MedsslError

__all__ = ["EXIT_PREEMPTED", "DEFAULT_SIGNALS", "Preempted", "PreemptionHandler"]

log = logging.getLogger(__name__)

#: exit code of a run that stopped on a preemption signal after writing its checkpoint (EX_TEMPFAIL)
EXIT_PREEMPTED = 75

#: signals treated as "checkpoint and stop": SLURM's ``--signal`` (USR1 by our templates) and SIGTERM
#: (what ``torchrun`` / ``srun`` / ``scancel`` send to the workers)
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(MedsslError):
    """The run stopped on a preemption signal after checkpointing at step ``step`` (resume it).

    Attributes:
        exit_code: :data:`EXIT_PREEMPTED`; the CLI exits with it.
        step: the optimizer step (or epoch, for epoch-granular engines) the checkpoint holds.
        checkpoint: the checkpoint file written, when known.
    """

    exit_code = EXIT_PREEMPTED

    def __init__(self, signum: int, step: int, checkpoint: Any = None, unit: str = "step") -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name if signum else "a signal to another rank"
        where = f" ({checkpoint})" if checkpoint else ""
        super().__init__(
            f"preempted by {name}: checkpoint written at {unit} {step}{where}; resume with --resume auto "
            f"(exit code {EXIT_PREEMPTED})"
        )


class PreemptionHandler:
    """Records preemption signals for an engine to act on at its next step boundary.

    Use as a context manager around the training loop (or :meth:`install` / :meth:`uninstall`)::

        with PreemptionHandler() as pre:
            while step < total:
                train_step()
                if pre.should_stop(any_rank=dd.any_across_ranks):
                    save_checkpoint(); raise Preempted(pre.signum, step)

    Args:
        signals: signal numbers to trap (default :data:`DEFAULT_SIGNALS`: SIGUSR1, SIGTERM).

    Only the main thread can install signal handlers; elsewhere (e.g. a training run inside a worker
    thread) :meth:`install` logs that preemption is off and :attr:`requested` stays False.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(int(s) for s in signals)
        self.signum: int = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of the trapped signals arrived (in this process)."""
        return self.signum != 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        if not self.signum:
            self.signum = signum
        # logging from a signal handler can deadlock on the handler's lock; the engine logs at the step boundary

    def install(self) -> PreemptionHandler:
        """Trap :attr:`signals` (remembering the previous handlers); a no-op off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            log.info("preemption signals not trapped: training runs outside the main thread")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, any_rank: Callable[[bool], bool] | None = None) -> bool:
        """Whether to checkpoint and stop now; with ``any_rank`` (a collective OR over DDP ranks, e.g.
        ``lambda f: dd.any_across_ranks(f, device)``) every rank answers alike."""
        flag = self.requested
        return bool(any_rank(flag)) if any_rank is not None else flag

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
