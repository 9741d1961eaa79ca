"""Finetuning (``medssl finetune``): ``engine`` (:class:`Finetuner` and :func:`run_finetune`), ``config``
(:class:`FinetuneConfig`), ``build`` (networks from scratch or an SSL checkpoint, optimizer param groups), ``data``
(the run's cases per (fraction, seed), transforms, datasets, epoch loaders), ``augment`` (crops and nnU-Net-style
augmentation), ``planner`` + ``plan`` (the data-derived segmentation recipe and its resolution at run start),
``evaluation`` (:class:`FinetuneEvaluator`, :class:`Selection`), ``metrics`` (Dice / HD95 / AUC …), ``native``
(scoring on the label's native grid), ``tta`` (test-time flips), ``mix`` (copy-paste of a self-training batch), ``ema`` (the weight average that is validated
and tested with ``ema_decay``), ``state`` (:class:`FinetuneCheckpointer`:
``best.pt`` / ``last.pt``, exact resume), ``ledger`` (the folder's MLflow run and what reached it: a resume logs
each metric step once), ``identity`` (``medssl.config_hash``), ``leakage`` (refusing an encoder
pretrained on validation/test cases), ``estimate`` (a run planned and timed on this machine without running it:
``medssl finetune --dry-run``) and ``result`` (:class:`FinetuneResult` and the MLflow run).

Every public name below is importable from this package (``from medssl.engines.finetune import ...``); it is
loaded from its module on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

from medssl.engines._lazy import load_attribute

#: module of this package that defines each public name
_MODULES: dict[str, tuple[str, ...]] = {
    "engine": (
        "Finetuner", "run_finetune",
    ),
    "estimate": (
        "RunEstimate", "estimate_run", "validation_count", "run_counts",
    ),
    "config": (
        "FinetuneConfig", "TASKS", "NETWORKS", "SCRATCH_ONLY", "AUTO", "AUTO_FIELDS", "is_auto",
    ),
    "build": (
        "build_model", "rebuild_model", "single_param_group", "param_groups",
    ),
    "data": (
        "datalist_by_case", "finetune_items", "planning_items", "class_weights", "eval_transforms", "train_transforms",
        "make_dataset", "seed_epoch", "epoch_loader", "items_hash", "data_channels", "run_items", "run_length",
    ),
    "augment": (
        "AUGMENT_DEFAULTS", "AUGMENT_OPTIONAL", "SAMPLINGS", "resolve_augment", "augment_transforms",
        "class_ratios", "crop_transforms", "trained_flip_axes",
    ),
    "planner": (
        "PLANNER_DEFAULTS", "plan_segmentation", "volume_header", "read_headers", "shapes_at",
        "median_target_spacing", "plan_patch", "plan_classes",
    ),
    "plan": (
        "resolve_plan", "check_run", "training_sampling", "present_classes",
    ),
    "evaluation": (
        "FinetuneEvaluator", "Selection",
    ),
    "metrics": (
        "SegmentationMetrics", "classification_metrics", "evaluate_model", "as_tensor", "image_diagonal_mm",
        "SELECTION_METRIC",
    ),
    "native": (
        "to_native_grid", "evaluate_native",
    ),
    "tta": (
        "flip_dims", "FlipTTAInferer",
    ),
    "ema": (
        "WeightEMA", "ema_decay_at",
    ),
    "pseudo": (
        "POOLS", "normalise_self_training", "pool_ids", "labelled_repeats", "PseudoLabels", "time_teacher",
    ),
    "mix": (
        "copy_paste_pairs", "bidirectional_copy_paste", "mix_generator",
    ),
    "state": (
        "RESUME_FIELDS", "FinetuneCheckpointer",
    ),
    "identity": (
        "RUN_KEYS", "config_identity", "config_hash", "config_changes", "file_sha256", "split_data_hash",
        "run_config_hash",
    ),
    "leakage": (
        "check_pretrain_leakage", "pretrained_case_ids",
    ),
    "result": (
        "FinetuneResult", "fmt_metrics", "open_tracker", "log_run_start", "PLAN_PARAMS",
    ),
    "ledger": (
        "adopt_run", "open_run", "close_run",
    ),
}

__all__ = [
    "Finetuner", "run_finetune", "RunEstimate", "estimate_run", "validation_count", "run_counts", "FinetuneConfig", "TASKS", "NETWORKS", "SCRATCH_ONLY", "AUTO", "AUTO_FIELDS",
    "is_auto", "build_model", "rebuild_model", "single_param_group", "param_groups", "datalist_by_case",
    "finetune_items", "planning_items", "class_weights", "eval_transforms", "train_transforms", "make_dataset",
    "seed_epoch", "epoch_loader", "items_hash", "data_channels", "run_items", "run_length", "AUGMENT_DEFAULTS", "AUGMENT_OPTIONAL",
    "SAMPLINGS", "resolve_augment", "augment_transforms", "class_ratios", "crop_transforms",
    "trained_flip_axes", "PLANNER_DEFAULTS", "plan_segmentation", "volume_header", "read_headers",
    "shapes_at", "median_target_spacing", "plan_patch", "plan_classes", "resolve_plan", "check_run",
    "training_sampling", "present_classes", "FinetuneEvaluator", "Selection", "SegmentationMetrics",
    "classification_metrics", "evaluate_model", "as_tensor", "image_diagonal_mm", "SELECTION_METRIC",
    "to_native_grid", "evaluate_native", "flip_dims", "FlipTTAInferer", "WeightEMA", "ema_decay_at", "POOLS",
    "normalise_self_training", "pool_ids", "labelled_repeats", "PseudoLabels", "time_teacher", "copy_paste_pairs",
    "bidirectional_copy_paste", "mix_generator", "RESUME_FIELDS",
    "FinetuneCheckpointer", "RUN_KEYS", "config_identity", "config_hash", "config_changes", "file_sha256",
    "split_data_hash", "run_config_hash", "check_pretrain_leakage", "pretrained_case_ids", "FinetuneResult",
    "fmt_metrics", "open_tracker", "log_run_start", "PLAN_PARAMS", "adopt_run", "open_run", "close_run",
]


def __getattr__(name: str) -> Any:
    return load_attribute(__name__, _MODULES, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
