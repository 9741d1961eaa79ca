"""The label-fraction sweep runner behind ``medssl sweep``: one MLflow parent run per study, pretraining
once (a child run, skipped when finished or replaced by a given checkpoint), then one finetuning child run
per (fraction, init, seed) with the standard tags (``medssl.study``, ``medssl.fraction``, ``medssl.init``,
``medssl.seed``, ``medssl.data_hash``, ``medssl.git_sha``) plus ``medssl.sweep_key``.

The pipeline file format, data preparation and checks live in :mod:`medssl.engines.studies.pipeline`. Re-running finds the
parent by its ``medssl.study`` tag, skips FINISHED children (MLflow status, or the local
``sweep_child.json`` marker when the end status is still spooled during an outage; the spools that killed
jobs left under the study folder are replayed first, ``medssl.tracking.spool``), resumes the others
from their deterministic folders (``resume="auto"``), and records a failing child as FAILED with
``medssl.error`` (tag and param) while the sweep goes on.

Modules: :mod:`medssl.engines.studies.results` (outcomes, local markers) and :mod:`medssl.engines.studies.runner`
(the parent run, children and their MLflow bookkeeping); this module holds the entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medssl.engines.studies.pipeline import Pipeline, base_init, finetune_dict, open_study
from medssl.engines.studies.results import SweepResult
from medssl.engines.studies.runner import SweepRun
from medssl.errors import MedsslError
from medssl.tracking.mlflow_tracker import default_tracking_uri

__all__ = ["run_sweep"]

log = logging.getLogger(__name__)


def _default_finetune(config: Any, *, resume: str | None, progress: bool) -> Any:
    from medssl.engines.finetune.engine import run_finetune

    return run_finetune(config, resume=resume, progress=progress)


def _default_pretrain(config: Any, *, resume: str | Path | None, progress: bool) -> Any:
    from medssl.engines.pretrain.engine import run_pretraining

    return run_pretraining(config, resume=resume, progress=progress)


def _replay_dead_spools(sweep: SweepRun) -> None:
    """Send what killed jobs of this study left in their outage spools (a finished child's end status, a
    dead parent's counters) before anything runs: a skipped child's spool would otherwise wait forever."""
    from medssl.tracking.spool import replay_spools

    roots = {sweep.pl.study_root, sweep.sweep_dir}
    res = replay_spools(sorted(roots), tracking_uri=sweep.uri, client=sweep.client)
    if res.sent or res.failed:
        log.info("study %s: %d spooled record(s) of earlier jobs replayed, %d spool(s) not yet",
                 sweep.pl.study, res.n_records, len(res.failed))


def run_sweep(
    pipeline: str | Path | dict[str, Any] | Pipeline,
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    new: bool = False,
    finetune_fn: Callable[..., Any] | None = None,
    pretrain_fn: Callable[..., Any] | None = None,
    progress: bool = False,
    child: str | int | None = None,
    parent_run_id: str | None = None,
) -> SweepResult:
    """Run (or resume) a label-efficiency study; the library entry point behind ``medssl sweep``.

    Args:
        pipeline: pipeline YAML path, dict or :class:`Pipeline`.
        overrides: dotted ``key=value`` changes of the pipeline (``["seeds=[0]", "finetune.max_steps=50"]``);
            not with a :class:`Pipeline`.
        new: start a new parent run even if the study exists (default: resume the newest one).
        finetune_fn: ``fn(FinetuneConfig, *, resume, progress) -> result`` with ``.run_id``,
            ``.test_metrics`` and ``.status``; default :func:`medssl.engines.finetune.engine.run_finetune`.
        pretrain_fn: ``fn(PretrainConfig, *, resume, progress) -> result`` with ``.encoder_path`` and
            ``.run_id``; default :func:`medssl.engines.pretrain.engine.run_pretraining`.
        progress: show the engines' progress bars.
        child: run only ``"pretrain"`` or the child with this 0-based index (order: :meth:`Pipeline.children`,
            as in ``sweep.json``), leaving the parent run open: one SLURM array task
            (:mod:`medssl.cluster.sweep_jobs`). A child needs the pretraining finished.
        parent_run_id: attach to this parent run (the one the SLURM submission made) instead of the newest.

    Returns:
        The :class:`SweepResult`; failed children are listed in ``result.failed`` (the sweep goes on).

    Raises:
        MedsslError: invalid pipeline/data (a fraction or seed missing from the splits, a class without
            cases), invalid finetune settings, MLflow unreachable at the start, or a reused SSL checkpoint
            that does not exist.
    """
    from medssl.engines.finetune.config import FinetuneConfig

    pl, datalist, splits = open_study(pipeline, overrides)
    for f, arm, _ in dict.fromkeys((f, a, 0) for f, a, _ in pl.children()):  # fail fast on bad finetune settings
        start = base_init(arm)
        paths = {"datalist": str(datalist), "splits": str(splits), "fraction": f}
        st = {"self_training": {**pl.student_options(), "teacher": "-"}} if start != arm else {}
        FinetuneConfig.from_dict({**finetune_dict(pl, f, arm), **paths, **st, "init": "ssl:x" if start == "ssl" else start})
    reuse = (pl.pretrain or {}).get("checkpoint") if "ssl" in pl.inits else None
    if reuse and not Path(reuse).exists():
        raise MedsslError(f"pretrain.checkpoint {reuse} does not exist")
    try:
        only = None if child is None else str(child)
        sweep = SweepRun(pl, datalist, splits, finetune_fn or _default_finetune, progress, new, parent_run_id, only)
    except MedsslError:
        raise
    except Exception as e:  # noqa: BLE001 - transport/store errors at the start become one clear line
        raise MedsslError(f"MLflow at {pl.tracking_uri or default_tracking_uri()} is unreachable: {e}") from e
    _replay_dead_spools(sweep)
    try:
        sweep.run(pretrain_fn or _default_pretrain)
    except BaseException:
        if child is None:  # an array task leaves the parent to the sweep (other tasks still log into it)
            sweep.parent.close("KILLED")
        raise
    if child is None:
        sweep.parent.close("FINISHED")
    else:
        sweep.parent.flush()
    return sweep.result
