"""Label-efficiency studies (``medssl sweep``): ``pipeline`` (the pipeline YAML format, data preparation and
checks), ``sweep`` (:func:`run_sweep`, the entry point), ``runner`` (:class:`SweepRun`: the MLflow parent run,
pretraining once and one finetuning child per (fraction, init, seed)), ``results`` (child outcomes and local
markers), ``estimate`` (a study counted and timed on this machine before it runs: ``medssl sweep --dry-run``)
and ``identity`` (what makes a child or the pretraining "the same run" when a study is re-run).
Comparing finished studies (tables, mean ± CI, paired differences) is :mod:`medssl.tracking.compare` /
:mod:`medssl.tracking.stats`: it reads MLflow, whoever wrote the runs (sweeps, bundles, single CLI runs).

Every public name below is importable from this package (``from medssl.engines.studies import ...``); it is
loaded from its module on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

from medssl.engines._lazy import load_attribute

#: module of this package that defines each public name
_MODULES: dict[str, tuple[str, ...]] = {
    "sweep": (
        "run_sweep",
    ),
    "pipeline": (
        "INITS", "STUDENT", "Pipeline", "load_pipeline", "prepare_data", "check_fractions_available", "open_study",
        "finetune_dict",
        "teacher_init", "base_init", "student_round", "student_arm",
    ),
    "runner": (
        "SweepRun",
    ),
    "results": (
        "ChildOutcome", "SweepResult", "read_marker",
    ),
    "estimate": (
        "TIME_KEYS", "ChildEstimate", "SweepEstimate", "estimate_sweep",
    ),
    "identity": (
        "PREPROCESSING_KEYS", "resolve_preprocessing", "pretrain_identity", "Conflict", "refuse_conflicts",
    ),
}

__all__ = [
    "run_sweep", "INITS", "STUDENT", "Pipeline", "load_pipeline", "prepare_data", "check_fractions_available", "open_study",
    "finetune_dict", "teacher_init", "base_init", "student_round", "student_arm", "SweepRun", "ChildOutcome",
    "SweepResult", "read_marker", "PREPROCESSING_KEYS", "resolve_preprocessing", "pretrain_identity", "Conflict",
    "refuse_conflicts", "TIME_KEYS", "ChildEstimate", "SweepEstimate", "estimate_sweep",
]


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _MODULES, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
