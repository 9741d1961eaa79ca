"""SSL pretraining (``medssl pretrain``): ``engine`` (:class:`Pretrainer`, the one-screen training step and
loop, and :func:`run_pretraining`, the library entry point), ``components`` (encoder / method / augmentation /
optimizer built from a :class:`~medssl.config.PretrainConfig`, or injected as :class:`PretrainParts` by a bundle),
``pool`` (which volumes make the unlabeled pool, and what the recipe records of it), ``data`` (their preprocessing
and the restorable :class:`CropBatcher` stream), ``pool_cache`` (RAM / persistent disk caches and DDP rank shards),
``state`` (:class:`PretrainCheckpointer`: the checkpoint dict and exact resume), ``events`` (the Ignite-named
:class:`Events` and the :class:`PretrainState` handlers read), ``handlers`` (the run's default handlers: checkpoint
saver, ``metrics.jsonl``, MLflow, kNN monitor, preview, progress; each a bundle ``_target_``), ``outputs``
(:class:`PretrainResult`, the MLflow run, encoder and end-of-run files), ``monitor`` (the kNN representation
monitor), ``preview`` (the augmentation preview PNG) and ``estimate`` (a run timed on this machine without
running it: ``medssl pretrain --dry-run``).

Every public name below is importable from this package (``from medssl.engines.pretrain import ...``); it is
loaded from its module on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

from medssl.engines._lazy import load_attribute

#: module of this package that defines each public name
_MODULES: dict[str, tuple[str, ...]] = {
    "engine": (
        "Pretrainer", "run_pretraining",
    ),
    "components": (
        "resolve_device", "build_components", "build_augment", "make_recipe", "method_kwargs_for",
        "GATHERING_METHODS", "cpu_has_native_bf16", "autocast_for", "to_memory_format", "place_model",
        "make_tracker", "PretrainParts", "method_name", "config_for_parts", "as_schedule", "param_groups",
        "check_optimizer",
    ),
    "pool": (
        "load_pool", "pool_channels", "pool_record", "resolve_in_channels", "pool_fingerprint",
    ),
    "data": (
        "preprocessing", "preprocessing_recipe", "CropBatcher",
    ),
    "events": (
        "Events", "PretrainState", "PretrainHandler", "EVENT_METHODS", "check_handlers", "fire", "fire_exception",
    ),
    "handlers": (
        "AugmentPreview", "KnnMonitor", "MetricsWriter", "StatsLogger", "MlflowLogger", "RichProgress",
        "CheckpointSaver", "default_handlers",
    ),
    "pool_cache": (
        "CACHE_MODES", "DATA_SHARDS", "shard_indices", "SafeCacheDataset", "recipe_key", "file_key",
        "DiskCacheDataset", "ShardView", "make_pool_dataset",
    ),
    "state": (
        "PretrainCheckpointer", "check_same_pool", "truncate_metrics_log",
    ),
    "outputs": (
        "PretrainResult", "start_tracking", "write_outputs", "run_artifacts",
    ),
    "monitor": (
        "ProbeSet", "RepresentationMonitor", "build_monitor", "build_probe_set", "embed", "knn_scores",
        "probe_items",
    ),
    "preview": (
        "save_augment_preview", "augment_preview", "PREVIEW_KEYS",
    ),
    "estimate": (
        "PretrainEstimate", "estimate_pretraining", "checkpoint_count",
    ),
}

__all__ = [
    "Pretrainer", "run_pretraining", "resolve_device", "build_components", "build_augment", "make_recipe",
    "method_kwargs_for", "GATHERING_METHODS", "cpu_has_native_bf16", "autocast_for", "to_memory_format",
    "place_model", "make_tracker", "PretrainParts", "method_name", "config_for_parts", "as_schedule",
    "param_groups", "check_optimizer", "load_pool", "pool_channels", "pool_record", "resolve_in_channels",
    "preprocessing", "preprocessing_recipe", "CropBatcher", "pool_fingerprint", "CACHE_MODES", "DATA_SHARDS",
    "shard_indices", "SafeCacheDataset", "recipe_key", "file_key", "DiskCacheDataset", "ShardView",
    "make_pool_dataset", "PretrainCheckpointer", "check_same_pool", "truncate_metrics_log", "PretrainResult",
    "start_tracking", "write_outputs", "run_artifacts", "Events", "PretrainState", "PretrainHandler", "EVENT_METHODS",
    "check_handlers", "fire", "fire_exception", "AugmentPreview", "KnnMonitor", "MetricsWriter", "StatsLogger",
    "MlflowLogger", "RichProgress", "CheckpointSaver", "default_handlers", "ProbeSet", "RepresentationMonitor", "build_monitor",
    "build_probe_set", "embed", "knn_scores", "probe_items", "save_augment_preview", "augment_preview",
    "PREVIEW_KEYS", "PretrainEstimate", "estimate_pretraining", "checkpoint_count",
]


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _MODULES, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
