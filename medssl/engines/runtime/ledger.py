"""What a run folder's MLflow run already holds: ``checkpoints/mlflow.json``, shared by pretraining and finetuning.

A run resumes from its last checkpoint and redoes the steps since then, recomputing the same values (exact resume).
Whatever an earlier attempt logged after that checkpoint (before a preemption, a crash, ``kill -9``, an OOM) must not
be sent again: the SQL store would keep a second row with a new timestamp and ``compare`` / the curves would see
doubles. :class:`MetricLedger` records, per metric key, the last step (the MLflow x) whose value became *durable*,
i.e. was sent or fsynced into the tracker's outage spool (the tracker's ``on_durable`` hook,
:class:`~medssl.tracking.mlflow_tracker.MlflowTracker`); a resumed run sends only what lies beyond. Records still in
the tracker's memory queue when a process dies are not recorded, so the resumed run sends them; the queue is made
durable (``MlflowTracker.persist()``) before every checkpoint, so nothing the resume will not redo is lost. One
mechanism for every way a run stops; it works while the tracking server is down (the spool holds the records), where
reading the run's metric history back from MLflow at resume would not.

The file also names the folder's MLflow run before any checkpoint exists (:func:`recorded_run`): a run interrupted
before its first checkpoint and restarted with the same config (:func:`config_key`) continues that run.

File: ``{"run_id": str, "config_key": str | None, "logged": {metric key: last durable step}}``, replaced
atomically (temporary file, fsync, rename) whenever a flush makes a new step durable: a few hundred bytes per flush.
Users: :mod:`medssl.engines.finetune.ledger` (``run_finetune``) and
:class:`~medssl.engines.pretrain.handlers.MlflowLogger` (``run_pretraining``), rank 0 only; both end their run with
:func:`close_tracker` (one rule for the status an error leaves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["LEDGER_FILE", "MetricLedger", "config_key", "recorded_run", "close_tracker"]

log = logging.getLogger(__name__)

#: the ledger's path under a run's ``out_dir`` (beside ``last.pt``)
LEDGER_FILE = "checkpoints/mlflow.json"


def config_key(config: Any) -> str:
    """sha256 (16 hex digits) of a run config (any object with ``to_dict()``: ``FinetuneConfig``,
    ``PretrainConfig``) as given: a folder's recorded run is continued without a checkpoint only by the same config
    (another one would log conflicting params into it)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_run(path: str | Path, key: str | None = None) -> str | None:
    """The MLflow run id the ledger at ``path`` names (``None``: no ledger, or recorded for another ``key``)."""
    data = _read(Path(path))
    if key is not None and data.get("config_key") != key:
        return None
    return data.get("run_id") or None


class MetricLedger:
    """Per metric key, the last step of MLflow run ``run_id`` that reached MLflow or its spool.

    Args:
        path: the ledger file (``out_dir/checkpoints/mlflow.json``); read when it records ``run_id`` (a resumed
            run), else started empty; written at once, so the folder names its run from the start.
        run_id: the MLflow run the folder logs into.
        config_key: :func:`config_key` of the run's config (lets a restart without a checkpoint continue the run).

    Example::

        ledger = MetricLedger("out/checkpoints/mlflow.json", tracker.run_id)
        tracker.on_durable = ledger.mark
        tracker.log_metrics(ledger.unlogged({"val_dice_mean": 0.8}, step=12), 12)   # {} if 12 was logged
    """

    def __init__(self, path: str | Path, run_id: str, *, config_key: str | None = None) -> None:
        self.path, self.run_id, self.config_key = Path(path), str(run_id), config_key
        old = _read(self.path)
        logged = old.get("logged") if old.get("run_id") == self.run_id else None
        self.logged: dict[str, int] = {str(k): int(v) for k, v in (logged or {}).items()}
        if self.logged:
            log.info("MLflow run %s: %d metric key(s) already logged (through step %d); not sent again",
                     self.run_id, len(self.logged), max(self.logged.values()))
        self.save()

    def unlogged(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """The entries of ``metrics`` not yet logged at ``step`` (their key's last logged step is below it)."""
        return {k: v for k, v in metrics.items() if k not in self.logged or int(step) > self.logged[k]}

    def mark(self, records: Iterable[dict[str, Any]]) -> None:
        """The tracker's ``on_durable`` hook: record the metric records' steps (others are ignored)."""
        changed = False
        for rec in records:
            if rec.get("type") != "metric":
                continue
            key, step = str(rec["key"]), int(rec["step"])
            if key not in self.logged or step > self.logged[key]:
                self.logged[key], changed = step, True
        if changed:
            self.save()

    def save(self) -> None:
        """Replace the file atomically (written, fsynced, renamed: a kill leaves the old or the new one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = {"run_id": self.run_id, "config_key": self.config_key, "logged": self.logged}
        with open(tmp, "w") as f:
            f.write(json.dumps(data, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def close_tracker(tracker: Any, error: BaseException | None = None) -> None:
    """End a training run's MLflow run (``tracker``: an open :class:`~medssl.tracking.mlflow_tracker.MlflowTracker`,
    or ``None``: nothing to do): FINISHED without ``error``; KILLED after a preemption (tag ``medssl.preempted``) or
    Ctrl-C, FAILED after any other error (tag ``medssl.error``), the tag holding the error's type and message."""
    if tracker is None:
        return
    if error is None:
        tracker.close("FINISHED")
        return
    from medssl.engines.runtime.preemption import Preempted

    tag = "medssl.preempted" if isinstance(error, Preempted) else "medssl.error"
    tracker.set_tags({tag: f"{type(error).__name__}: {error}"[:1000]})
    tracker.close("KILLED" if isinstance(error, (KeyboardInterrupt, Preempted)) else "FAILED")
