"""Segmentation experiment planner: the recipe's data-dependent defaults, derived from the training cases.

Like nnU-Net's experiment planner (Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 2021), but sized for a CPU budget:

1. **Target spacing** (mm): the given one, else the median voxel size of the cases; with anisotropic data
   (largest / smallest median spacing > 3) the low-resolution axis takes the 10th percentile of its spacings
   instead (nnU-Net's rule: fewer interpolated slices).
2. **Median shape** at that spacing, in RAS axis order (the order ``Orientationd("RAS")`` gives the network).
3. **Downsampling**: per level, an axis is halved while it stays >= ``min_bottleneck`` voxels and its
   spacing is at most twice the finest (nnU-Net's pooling rule), up to ``max_levels`` levels.
4. **Patch**: the whole median volume, each axis rounded *up* to a multiple of its total stride, when that
   fits ``patch_voxel_budget``; else the largest patch with the median aspect ratio inside the budget, each
   axis rounded *down* to a multiple of its stride.
5. **Batch**: ``step_voxel_budget // (patch voxels × crops per volume)``, clamped to ``[2, 32]``; one crop per
   volume when the patch covers the median volume, else two.
6. **Network**: MONAI ``UNet`` (residual units, the planned strides, widths ``base_width · 2^level`` capped
   at ``max_width``) and ``SegResNet`` (``init_filters`` 16, as many isotropic levels as every axis
   allows) arguments, so either can be built from the plan.
7. **Classes**: the datalist's ``labels`` table when given, else the label values found in the first
   ``class_probe_cases`` label maps.

Headers only are read (nibabel: shape, affine, voxel size), except the few label maps of step 7. The
output is plain data (JSON-serialisable), logged, stored in the finetuning recipe and resolved into the
run's config (:mod:`medssl.engines.finetune.plan`).

Default budgets (2-core CPU): ``patch_voxel_budget`` = 64³ = 262,144 voxels (a whole MSD hippocampus volume,
35×50×36 at 1 mm, is 40×56×40 = 89,600 planned), ``step_voxel_budget`` = 393,216 (1.5 × 64³: batch 4 of
hippocampus volumes, about 2–3 s per step for the planned 4.7 M-parameter UNet on 2 CPU cores). On a GPU,
raise both (e.g. ``patch_voxel_budget=128**3``, ``step_voxel_budget=2 * 128**3``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medssl.errors import MedsslError

__all__ = [
    "PLANNER_DEFAULTS",
    "plan_segmentation",
    "volume_header",
    "read_headers",
    "shapes_at",
    "median_target_spacing",
    "plan_patch",
    "plan_classes",
]

log = logging.getLogger(__name__)

#: keyword defaults of :func:`plan_segmentation` (``FinetuneConfig.planner`` overrides them)
PLANNER_DEFAULTS: dict[str, Any] = {
    "patch_voxel_budget": 64**3,
    "step_voxel_budget": 3 * 2**17,
    "min_bottleneck": 4,
    "max_levels": 5,
    "base_width": 32,
    "max_width": 320,
    "segresnet_filters": 16,
    "min_batch": 2,
    "max_batch": 32,
    "class_probe_cases": 5,
}
_ANISO = 3.0  # nnU-Net's anisotropy threshold (largest / smallest median spacing)


def _first_file(image: str | Sequence[str]) -> str:
    return str(image[0] if isinstance(image, (list, tuple)) else image)


def volume_header(path: str | Path) -> tuple[list[int], list[float]]:
    """Shape and voxel size (mm) of a NIfTI volume in RAS axis order, from its header only.

    Example: a file whose voxel axes run (P→A, L→R, I→S) with shape (50, 35, 36) and voxel size
    (1, 0.8, 2) returns ``([35, 50, 36], [0.8, 1.0, 2.0])``: the axes ``Orientationd("RAS")`` gives.

    Raises:
        MedsslError: the file cannot be read (path and reason named) or is not 3D / 4D.
    """
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types; the message names the file
        raise MedsslError(f"cannot read the header of {path}: {e}") from e
    if len(img.shape) < 3:
        raise MedsslError(f"{path} is not a 3D volume (shape {img.shape})")
    shape, zooms = img.shape[:3], img.header.get_zooms()[:3]
    ornt = nib.orientations.io_orientation(img.affine)  # row i: output (RAS) axis of input axis i
    out_shape, out_sp = [0, 0, 0], [0.0, 0.0, 0.0]
    for i in range(3):
        out_shape[int(ornt[i, 0])] = int(shape[i])
        out_sp[int(ornt[i, 0])] = round(float(zooms[i]), 6)  # header zooms are float32
    return out_shape, out_sp


def read_headers(items: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(shapes (N, 3) int, spacings (N, 3) float mm)`` of the items' images (first channel file)."""
    if not items:
        raise MedsslError("no cases to plan from")
    heads = [volume_header(_first_file(it["image"])) for it in items]
    return np.array([h[0] for h in heads], dtype=int), np.array([h[1] for h in heads], dtype=float)


def shapes_at(shapes: np.ndarray, spacings: np.ndarray, target: Sequence[float] | None) -> np.ndarray:
    """Shapes ``(N, 3)`` after resampling to ``target`` mm (``None``: unchanged), as ``round(n · s / t)``."""
    if target is None:
        return np.asarray(shapes, dtype=int)
    t = np.asarray(target, dtype=float)
    return np.maximum(1, np.round(np.asarray(shapes) * np.asarray(spacings) / t)).astype(int)


def median_target_spacing(spacings: np.ndarray) -> list[float]:
    """Median voxel size per axis; with anisotropy (max / min > 3) the coarsest axis takes its 10th
    percentile (nnU-Net). Example: spacings (1, 1, 5) and (1, 1, 3) → (1, 1, 3.2)."""
    med = np.median(spacings, axis=0)
    if med.max() / med.min() > _ANISO:
        axis = int(np.argmax(med))
        med[axis] = float(np.percentile(spacings[:, axis], 10))
    return [round(float(s), 6) for s in med]


def _strides(size: Sequence[float], spacing: Sequence[float], min_bottleneck: int,
             max_levels: int) -> list[list[int]]:
    """Per-level strides ``[[sx, sy, sz], ...]``: halve an axis while it keeps >= ``min_bottleneck`` voxels
    and its (current) spacing is <= twice the finest one."""
    size, spacing = [float(s) for s in size], [float(s) for s in spacing]
    out: list[list[int]] = []
    for _ in range(max_levels):
        finest = min(spacing)
        st = [2 if size[a] / 2 >= min_bottleneck and spacing[a] <= 2 * finest else 1 for a in range(3)]
        if st == [1, 1, 1]:
            break
        out.append(st)
        size = [s / k for s, k in zip(size, st, strict=True)]
        spacing = [s * k for s, k in zip(spacing, st, strict=True)]
    return out


def plan_patch(
    median_shape: Sequence[int],
    spacing: Sequence[float],
    *,
    patch_voxel_budget: int,
    min_bottleneck: int = 4,
    max_levels: int = 5,
) -> dict[str, Any]:
    """Patch size and per-level strides for a median volume (steps 3–4 of the module docstring).

    Example: median ``(35, 50, 36)`` at 1 mm, budget 64³ → strides ``[[2, 2, 2]] * 3``, patch
    ``(40, 56, 40)`` (multiples of 8), bottleneck ``(5, 7, 5)``, ``whole_volume`` True.

    Returns:
        ``{"patch_size", "strides", "levels", "bottleneck", "whole_volume"}`` (voxels).
    """
    shape = [max(1, int(s)) for s in median_shape]
    # the whole median volume, or the median shape scaled down to the budget (same aspect ratio)
    f = min(1.0, (patch_voxel_budget / math.prod(shape)) ** (1 / 3))
    base = [s * f for s in shape]
    strides = _strides(base, spacing, min_bottleneck, max_levels)
    div = [math.prod(st[a] for st in strides) for a in range(3)]
    patch = [int(math.ceil(b / d) * d) for b, d in zip(base, div, strict=True)]
    if math.prod(patch) > patch_voxel_budget:  # round down instead (at least one stride product)
        patch = [max(d, int(b // d) * d) for b, d in zip(base, div, strict=True)]
    return {
        "patch_size": patch,
        "strides": strides,
        "levels": len(strides),
        "bottleneck": [p // d for p, d in zip(patch, div, strict=True)],
        "whole_volume": all(p >= s for p, s in zip(patch, shape, strict=True)),
    }


def plan_classes(
    label_paths: Sequence[str], labels: Mapping[str, Any] | None = None, *, probe: int = 5
) -> dict[str, str]:
    """The class table ``{"0": "background", "1": name, ...}``: the datalist's ``labels`` when given, else
    the integer values of the first ``probe`` label maps (names = the values).

    Raises:
        MedsslError: no table and no label map to read, or a label map that cannot be read (path named).
    """
    if labels:
        return {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    if not label_paths:
        raise MedsslError("no label maps to find the classes in (items need 'label')")
    found: set[int] = set()
    for p in list(label_paths)[:probe]:
        try:
            data = np.asanyarray(nib.load(str(p)).dataobj)
        except Exception as e:  # noqa: BLE001 - the message names the file
            raise MedsslError(f"cannot read label map {p}: {e}") from e
        found |= {int(v) for v in np.unique(data)}
    values = sorted(found | {0})
    return {str(v): ("background" if v == 0 else str(v)) for v in range(max(values) + 1)}


def _network_kwargs(strides: list[list[int]], *, base_width: int, max_width: int,
                    segresnet_filters: int) -> dict[str, dict[str, Any]]:
    widths = [min(max_width, base_width * 2**i) for i in range(len(strides) + 1)]
    iso = 0
    for st in strides:  # SegResNet downsamples every axis at once: only the levels where all axes pool
        if st != [2, 2, 2]:
            break
        iso += 1
    return {
        "UNet": {
            "channels": widths,
            "strides": [st[0] if len(set(st)) == 1 else list(st) for st in strides],
            "num_res_units": 2,
        },
        "SegResNet": {
            "init_filters": int(segresnet_filters),
            "blocks_down": [1, 2, 2, 4, 4, 4][: iso + 1],
            "blocks_up": [1] * iso,
        },
    }


def plan_segmentation(
    items: Sequence[Mapping[str, Any]],
    *,
    target_spacing: Sequence[float] | None = None,
    resample: bool = True,
    labels: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Plan a segmentation recipe from the training cases' headers (module docstring: steps 1–7).

    Args:
        items: datalist items ``{"image": path | [paths], "label": path, ...}`` (absolute paths); plan on
            the study's labelled cases outside the test set, so every fraction and seed gets the same plan.
        target_spacing: voxel size in mm ``(x, y, z)``; ``None`` = the median rule.
        resample: ``False`` plans on the native grids (no target spacing; ``plan["target_spacing"]`` None).
        labels: the datalist's class table, if any.
        options: :data:`PLANNER_DEFAULTS` keys (budgets in voxels, widths, batch limits).

    Returns:
        ``{"version", "cases", "target_spacing" (mm | None), "spacing_source" ("given" | "median" |
        "native"), "median_shape", "min_shape", "max_shape", "patch_size", "strides", "levels",
        "bottleneck", "whole_volume", "num_samples", "batch_size", "classes", "num_classes", "network":
        {"UNet": kwargs, "SegResNet": kwargs}, "options"}`` (shapes in voxels, RAS axis order).

    Raises:
        MedsslError: no items, an unreadable header / label map, an unknown option (valid ones named).
    """
    unknown = sorted(set(options) - set(PLANNER_DEFAULTS))
    if unknown:
        raise MedsslError(f"unknown planner option(s) {unknown}; valid: {sorted(PLANNER_DEFAULTS)}")
    opt = {**PLANNER_DEFAULTS, **options}
    shapes, spacings = read_headers(items)
    if not resample:
        target, source = None, "native"
    elif target_spacing is not None:
        target, source = [float(s) for s in target_spacing], "given"
    else:
        target, source = median_target_spacing(spacings), "median"
    at = shapes_at(shapes, spacings, target)
    median = [int(round(float(v))) for v in np.median(at, axis=0)]
    grid = target if target is not None else [float(s) for s in np.median(spacings, axis=0)]
    patch = plan_patch(median, grid, patch_voxel_budget=int(opt["patch_voxel_budget"]),
                       min_bottleneck=int(opt["min_bottleneck"]), max_levels=int(opt["max_levels"]))
    num_samples = 1 if patch["whole_volume"] else 2
    per_step = math.prod(patch["patch_size"]) * num_samples
    batch = int(min(opt["max_batch"], max(opt["min_batch"], opt["step_voxel_budget"] // per_step)))
    classes = plan_classes([str(it["label"]) for it in items if it.get("label")], labels,
                           probe=int(opt["class_probe_cases"]))
    plan = {
        "version": 1,
        "cases": len(items),
        "target_spacing": target,
        "spacing_source": source,
        "median_shape": median,
        "min_shape": [int(v) for v in at.min(axis=0)],
        "max_shape": [int(v) for v in at.max(axis=0)],
        **patch,
        "num_samples": num_samples,
        "batch_size": batch,
        "classes": classes,
        "num_classes": len(classes),
        "network": _network_kwargs(patch["strides"], base_width=int(opt["base_width"]),
                                   max_width=int(opt["max_width"]),
                                   segresnet_filters=int(opt["segresnet_filters"])),
        "options": opt,
    }
    log.info(
        "plan (%d cases): spacing %s mm (%s), median shape %s, patch %s (%s), strides %s, batch %d x %d, "
        "classes %s",
        len(items), target, source, median, patch["patch_size"],
        "whole volume" if patch["whole_volume"] else "crops", patch["strides"], batch, num_samples,
        classes,
    )
    return plan
