"""Run-start planning of a finetuning run: ``"auto"`` fields resolved, and a recipe that cannot fit the data
refused before any training.

:func:`resolve_plan` plans the study (:func:`medssl.engines.finetune.planner.plan_segmentation` on every labelled case
outside the test set, so all fractions and seeds of a study get one plan), replaces each ``"auto"`` field of
the :class:`~medssl.engines.finetune.config.FinetuneConfig` by the planned value (explicit values always win)
and checks the result against the run's cases. The resolved config is what ``config.yaml``, the checkpoint
recipe and the MLflow params record, so a run is reproducible without re-planning; the plan itself is stored
as ``recipe["plan"]`` and ``plan.json``.

With an SSL init the checkpoint fixes what it was pretrained with: its spacing when ``target_spacing`` is
``None``, its encoder (planned network widths are dropped), and the crop must suit it (a ViT's ``img_size``,
multiples of the encoder's ``size_divisor``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medssl.data.splits import fraction_key
from medssl.engines.finetune.config import AUTO, FinetuneConfig, is_auto
from medssl.engines.finetune.data import planning_items
from medssl.engines.finetune.planner import plan_segmentation, read_headers, shapes_at
from medssl.errors import MedsslError

__all__ = ["resolve_plan", "check_run", "training_sampling", "present_classes"]

log = logging.getLogger(__name__)

_PLANNED_NETS = ("UNet", "SegResNet")


def _ssl_preprocessing(config: FinetuneConfig) -> dict[str, Any]:
    from medssl.networks.transfer import load_ssl_checkpoint

    return load_ssl_checkpoint(config.ssl_source, tracking_uri=config.tracking_uri).preprocessing


def _datalist_labels(datalist: str | Path) -> dict[str, Any] | None:
    try:
        labels = json.loads(Path(datalist).read_text()).get("labels")
    except (OSError, ValueError) as e:
        raise MedsslError(f"cannot read datalist {datalist}: {e}") from e
    return labels if isinstance(labels, dict) and labels else None


def resolve_plan(
    config: FinetuneConfig, items: dict[str, list[dict[str, Any]]]
) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """Plan a segmentation run, resolve its ``"auto"`` fields and check it fits the data.

    Args:
        config: the run config (``"auto"`` where the planner decides).
        items: the run's cases (:func:`~medssl.engines.finetune.data.finetune_items`).

    Returns:
        ``(resolved config, plan)``; classification: ``(config, None)`` unchanged (nothing is planned).

    Raises:
        MedsslError: the recipe cannot fit the data (:func:`check_run`), or planning failed (a header or label
            map that cannot be read, named).
    """
    if config.task != "segmentation":
        return config, None
    pre = _ssl_preprocessing(config) if config.ssl_source is not None else {}
    spacing = config.target_spacing
    if spacing is None and config.ssl_source is not None:
        spacing = pre.get("target_spacing")
    plan = plan_segmentation(
        planning_items(config.datalist, config.splits),
        target_spacing=None if is_auto(spacing) else spacing,
        resample=spacing is not None,
        labels=_datalist_labels(config.datalist),
        **config.planner,
    )
    changes: dict[str, Any] = {}
    if is_auto(config.target_spacing):
        changes["target_spacing"] = plan["target_spacing"]
    if is_auto(config.out_channels):
        changes["out_channels"] = plan["num_classes"]
    if is_auto(config.num_samples):
        changes["num_samples"] = plan["num_samples"]
    if is_auto(config.batch_size):
        n = len(items["training"])
        changes["batch_size"] = min(plan["batch_size"], n)
        if n < plan["batch_size"]:
            log.info("batch_size: planned %d, the fraction holds %d training cases: %d", plan["batch_size"], n, n)
    if is_auto(config.roi_size):
        changes["roi_size"] = _ssl_roi(plan["patch_size"], pre) if pre else list(plan["patch_size"])
    if "network_kwargs" in config.auto_fields:
        changes["network_kwargs"] = _network_kwargs(config, plan)
    cfg = config.replace(**changes)
    if changes:
        log.info("planned values: %s", {k: v for k, v in changes.items() if k != "network_kwargs"}
                 | ({"network_kwargs": changes["network_kwargs"]} if "network_kwargs" in changes else {}))
    check_run(cfg, items, plan)
    return cfg, plan


def _ssl_roi(patch: Sequence[int], pre: dict[str, Any]) -> list[int]:
    """The planned patch made acceptable to an SSL encoder: its ViT ``img_size``, else multiples of its
    ``size_divisor`` (rounded up)."""
    if pre.get("img_size") is not None:
        return [int(s) for s in pre["img_size"]]
    div = int(pre.get("size_divisor") or 1)
    return [int(math.ceil(int(p) / div) * div) for p in patch]


def _network_kwargs(config: FinetuneConfig, plan: dict[str, Any]) -> dict[str, Any]:
    given = config.network_kwargs if isinstance(config.network_kwargs, dict) else {}
    explicit = {k: v for k, v in given.items() if not is_auto(v)}
    if config.ssl_source is not None:  # the SSL recipe fixes the encoder: nothing to plan
        log.info("network_kwargs 'auto' with SSL init: the encoder recipe decides (%s)", config.ssl_source)
        return explicit
    if config.network not in _PLANNED_NETS:
        raise MedsslError(
            f"network_kwargs 'auto': the planner sizes {_PLANNED_NETS} only, not {config.network}; "
            "set network_kwargs explicitly"
        )
    planned = plan["network"][config.network]
    wanted = planned if not isinstance(config.network_kwargs, dict) else {
        k: planned[k] for k, v in given.items() if is_auto(v) and k in planned}
    unknown = [k for k, v in given.items() if is_auto(v) and k not in planned]
    if unknown:
        raise MedsslError(
            f"network_kwargs {unknown} cannot be 'auto' for {config.network}; planned keys: {sorted(planned)}"
        )
    return {**wanted, **explicit}


def present_classes(label_path: str) -> set[int]:
    """Integer classes present in a label map (read whole: class checks need the values)."""
    try:
        return {int(v) for v in np.unique(np.asanyarray(nib.load(label_path).dataobj))}
    except Exception as e:  # noqa: BLE001 - the message names the file
        raise MedsslError(f"cannot read label map {label_path}: {e}") from e


def check_run(config: FinetuneConfig, items: dict[str, list[dict[str, Any]]], plan: dict[str, Any]) -> None:
    """Refuse, before training, a resolved recipe that cannot fit the data (message names the value to change).

    Raises:
        MedsslError: ``out_channels`` below the planned class count; a class absent from every training case
            of the fraction; no validation case for the seed; ``batch_size`` above the fraction's training
            cases; a ``roi_size`` axis more than twice the largest training volume (mostly padding).
    """
    frac = f"fraction {fraction_key(config.fraction)} % of seed {config.seed}"
    k = int(config.out_channels)
    if k < plan["num_classes"]:
        raise MedsslError(
            f"out_channels={k} but the labels hold {plan['num_classes']} classes {plan['classes']}: "
            f"set out_channels: {plan['num_classes']} (or auto)"
        )
    if not items["validation"]:
        raise MedsslError(f"seed {config.seed} has no validation case in {config.splits}: raise val_fraction "
                          "in `medssl split` (or add labelled cases)")
    n = len(items["training"])
    if int(config.batch_size) > n:
        raise MedsslError(f"batch_size={config.batch_size} but {frac} holds {n} training case(s): "
                          f"lower batch_size to <= {n} (or auto), or use a larger fraction")
    seen: set[int] = set()
    for it in items["training"]:
        seen |= present_classes(str(it["label"]))
        if seen >= set(range(k)):
            break
    absent = [c for c in range(1, k) if c not in seen]
    if absent:
        names = {c: plan["classes"].get(str(c), str(c)) for c in absent}
        raise MedsslError(
            f"{frac} has no training case with class(es) {names} (out of {n} cases): use a larger fraction, "
            "re-split with stratification, or lower out_channels"
        )
    largest = _largest_shape(items["training"], config.target_spacing)
    too_big = [a for a in range(3) if int(config.roi_size[a]) > 2 * largest[a]]
    if too_big:
        raise MedsslError(
            f"roi_size={list(config.roi_size)} is more than twice the largest training volume {largest} "
            f"(voxels at the run's spacing) on axis {too_big}: the crops would be mostly padding; lower "
            f"roi_size (the planner proposes {plan['patch_size']}: roi_size: {AUTO})"
        )


def _largest_shape(training: list[dict[str, Any]], spacing: Sequence[float] | None) -> list[int]:
    shapes, spacings = read_headers(training)
    return [int(v) for v in shapes_at(shapes, spacings, spacing).max(axis=0)]


def training_sampling(config: FinetuneConfig, training: list[dict[str, Any]]) -> str:
    """The crop sampling the run uses: ``"whole"`` when ``roi_size`` covers every training volume (at the
    run's spacing; padding only, no sampling), else ``config.sampling``."""
    if config.task != "segmentation":
        return "none"
    shapes, spacings = read_headers(training)
    at = shapes_at(shapes, spacings, config.target_spacing)
    if bool(np.all(at <= np.asarray(config.roi_size, dtype=int))):
        return "whole"
    return config.sampling
