"""The MLflow run of a finetuning run folder and what already reached it: ``checkpoints/mlflow.json``.

A finetuning run resumes from ``checkpoints/last.pt`` (written at epoch ends) and redoes the steps since then; the
:class:`~medssl.engines.runtime.ledger.MetricLedger` (:mod:`medssl.engines.runtime.ledger`, shared with
pretraining) records per metric key the last step that reached MLflow or its outage spool, so the resumed run sends
each step once.

This module opens and closes the finetuning run around it: :func:`open_run` with ``resume="auto"`` and no
``last.pt`` continues the run the folder's ledger names for the same config (a run interrupted before its first
epoch end, e.g. a sweep child preempted and requeued), so a study keeps one run per child; :func:`adopt_run` names
a run found by its sweep tags for a folder without a ledger; :func:`close_run` ends it with the right status.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.runtime.ledger import LEDGER_FILE, MetricLedger, close_tracker, config_key, recorded_run

__all__ = ["adopt_run", "open_run", "close_run"]

log = logging.getLogger(__name__)


def adopt_run(out_dir: str | Path, run_id: str | None, config: FinetuneConfig) -> bool:
    """Name ``run_id`` the MLflow run of ``out_dir`` when the folder names none and holds no ``last.pt``, so that
    ``resume="auto"`` continues it: a sweep child interrupted before its folder recorded its run (found by its
    ``medssl.sweep_key`` tag instead) is not duplicated. Returns whether the folder now names ``run_id``."""
    out = Path(out_dir)
    if not run_id or (out / "checkpoints" / "last.pt").exists() or recorded_run(out / LEDGER_FILE):
        return False
    MetricLedger(out / LEDGER_FILE, run_id, config_key=config_key(config))
    log.info("%s: continuing the interrupted MLflow run %s found by its tags", out, run_id)
    return True


def open_run(
    config: FinetuneConfig, state: dict[str, Any] | None, *, resume: str | Path | None
) -> tuple[Any, MetricLedger | None]:
    """The MLflow tracker of a finetuning run and its ledger (``(None, None)`` without ``config.experiment``).

    The run: the checkpoint's ``mlflow_run_id`` (``state``: a loaded ``last.pt``); without a checkpoint and with
    ``resume="auto"``, the run the folder's ledger records for the same config (an attempt interrupted before its
    first ``last.pt``); else a new run.
    """
    if not config.experiment:
        return None, None
    from medssl.engines.finetune.result import open_tracker

    path, key = Path(config.out_dir) / LEDGER_FILE, config_key(config)
    if state is not None:
        run_id = state.get("mlflow_run_id")
    else:
        run_id = recorded_run(path, key) if resume == "auto" else None
    tracker = open_tracker(config, run_id)
    if state is None and run_id is not None and tracker.run_id == run_id:
        log.info("continuing MLflow run %s of %s (interrupted before its first checkpoint)", run_id, config.out_dir)
    ledger = MetricLedger(path, tracker.run_id, config_key=key)
    tracker.on_durable = ledger.mark
    return tracker, ledger


def close_run(tracker: Any, error: BaseException | None = None, *, out_dir: str | Path | None = None) -> None:
    """End the MLflow run (:func:`~medssl.engines.runtime.ledger.close_tracker`): FINISHED; KILLED after a preemption
    or Ctrl-C (tag ``medssl.preempted``); else FAILED (tag ``medssl.error``). An SSL checkpoint that did not fit (``TransferError``) leaves its report as
    ``out_dir/transfer_report.json`` (and artifact) whether or not the run is tracked."""
    from medssl.networks.transfer import TransferError

    if isinstance(error, TransferError) and out_dir is not None:
        report = Path(out_dir) / "transfer_report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(error.report.to_dict(), indent=1))
        if tracker is not None:
            tracker.log_artifact(report)
    close_tracker(tracker, error)
