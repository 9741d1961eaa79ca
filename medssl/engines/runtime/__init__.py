"""Run-time machinery shared by pretraining and finetuning, independent of any SSL method or task:
``checkpoint`` (atomic checkpoint files, RNG capture/restore and seeding, the encoder file, recipe checks),
``distributed`` (torchrun process groups, DDP wrapping, cross-rank reductions), ``schedules`` (warm-up + cosine lr
and the finetuning schedule of pretrained weights), ``preemption`` (SIGUSR1/SIGTERM trap → checkpoint → exit 75
for a SLURM requeue), ``progress`` (the rich progress bar) ``ledger`` (``checkpoints/mlflow.json``: what a run's
MLflow run already holds, so a resumed run logs each metric step once) and ``estimate`` (what the dry runs share).

Every public name below is importable from this package (``from medssl.engines.runtime import ...``); it is
loaded from its module on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

from medssl.engines._lazy import load_attribute

#: module of this package that defines each public name
_MODULES: dict[str, tuple[str, ...]] = {
    "checkpoint": (
        "library_versions", "cpu_model", "machine_info", "machine_tag", "capture_rng", "restore_rng", "seed_all", "atomic_save", "load_checkpoint",
        "check_recipe", "save_encoder", "component_state", "load_component_state", "IDENTITY_FIELDS",
    ),
    "estimate": (
        "TimedEstimate",
    ),
    "distributed": (
        "DistInfo", "env_world_size", "init_distributed", "dist_info", "cleanup_distributed", "barrier",
        "all_gather_objects", "mean_across_ranks", "any_across_ranks", "wrap_ddp", "select_rank_state",
    ),
    "schedules": (
        "warmup_cosine", "WarmupCosineSchedule", "AUTO_SSL_SCHEDULE", "SSL_SCHEDULE_KEYS",
        "normalise_ssl_schedule", "resolve_ssl_schedule", "ssl_schedule_identity",
        "check_ssl_schedule_options", "pretrained_lr_factor",
    ),
    "preemption": (
        "EXIT_PREEMPTED", "DEFAULT_SIGNALS", "Preempted", "PreemptionHandler",
    ),
    "progress": (
        "ProgressBar",
    ),
    "ledger": (
        "LEDGER_FILE", "MetricLedger", "config_key", "recorded_run", "close_tracker",
    ),
}

__all__ = [
    "TimedEstimate",
    "library_versions", "cpu_model", "machine_info", "machine_tag", "capture_rng", "restore_rng", "seed_all", "atomic_save", "load_checkpoint",
    "check_recipe", "save_encoder", "component_state", "load_component_state", "IDENTITY_FIELDS", "DistInfo",
    "env_world_size", "init_distributed", "dist_info", "cleanup_distributed", "barrier", "all_gather_objects",
    "mean_across_ranks", "any_across_ranks", "wrap_ddp", "select_rank_state", "warmup_cosine",
    "WarmupCosineSchedule", "AUTO_SSL_SCHEDULE", "SSL_SCHEDULE_KEYS", "normalise_ssl_schedule",
    "resolve_ssl_schedule", "ssl_schedule_identity", "check_ssl_schedule_options", "pretrained_lr_factor",
    "EXIT_PREEMPTED", "DEFAULT_SIGNALS", "Preempted", "PreemptionHandler", "ProgressBar", "LEDGER_FILE",
    "MetricLedger", "config_key", "recorded_run", "close_tracker",
]


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _MODULES, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
