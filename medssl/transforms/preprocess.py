"""One preprocessing chain, built from a plain recipe: pretraining, finetuning, export, predict and serving.

The chain is deterministic and invertible (MONAI ``Invertd`` works on its output, so a prediction on the
preprocessed grid maps back onto the input's exact shape and affine)::

    LoadImaged → EnsureChannelFirstd → Orientationd(axcodes) → Spacingd(target_spacing)
        → normalisation (robust | ct | none) → EnsureTyped(float32) [→ ResizeWithPadOrCropd(roi), classification]

The recipe is the ``preprocessing`` dict of :class:`medssl.deploy.model.DeployModel` (keys ``task``,
``axcodes``, ``target_spacing``, ``normalisation``, ``ct_window``, ``roi_size``; others are ignored), e.g.::

    {"task": "segmentation", "axcodes": "RAS", "target_spacing": [1.0, 1.0, 1.0],
     "normalisation": "robust", "ct_window": [-1000, 1000], "roi_size": [32, 32, 32]}

:func:`medssl.engines.pretrain.data.preprocessing` (pretraining) and
:func:`medssl.engines.finetune.data.eval_transforms` (finetuning evaluation, the cached head of training)
delegate here, so every stage sees identical tensors for the same volume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from medssl.errors import MedsslError
from medssl.transforms.intensity import NormalizeIntensityRobustd

__all__ = ["ORIENTATION_LABELS", "NORMALISATIONS", "DEFAULT_CT_WINDOW", "preprocess_transforms", "normaliser"]

log = logging.getLogger(__name__)

#: the anatomical labels of the array axes (MONAI's default): "RAS" = +x right, +y anterior, +z superior
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
NORMALISATIONS = ("robust", "ct", "none")
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)


def normaliser(normalisation: str, keys: Sequence[str], ct_window: Sequence[float] = DEFAULT_CT_WINDOW) -> Any | None:
    """The intensity normalisation of ``keys``, or ``None`` for ``"none"``.

    Args:
        normalisation: ``"robust"`` (per-volume 0.5–99.5 percentile clip, scaled to [0, 1]: MRI of any scale),
            ``"ct"`` (``ct_window`` HU → [0, 1], clipped; e.g. (-1000, 1000) maps 0 HU to 0.5) or ``"none"``.
        keys: image keys.
        ct_window: ``(lo, hi)`` HU window for ``"ct"``.

    Raises:
        MedsslError: an unknown normalisation or a window with ``lo >= hi``.
    """
    if normalisation == "robust":
        return NormalizeIntensityRobustd(list(keys))
    if normalisation == "ct":
        lo, hi = (float(v) for v in ct_window)
        if lo >= hi:
            raise MedsslError(f"preprocessing ct_window must be [lo, hi] HU with lo < hi, got {list(ct_window)}")
        return ScaleIntensityRanged(list(keys), a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if normalisation != "none":
        raise MedsslError(f"preprocessing normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    return None


def preprocess_transforms(
    prep: Mapping[str, Any],
    *,
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    native_label: bool = False,
    load: bool = True,
    track_meta: bool = True,
) -> Compose:
    """The deterministic preprocessing chain of a recipe (see the module docstring).

    Args:
        prep: the recipe: ``task`` (``"segmentation"`` default / ``"classification"``), ``axcodes``
            (default ``"RAS"``), ``target_spacing`` (3 mm values or ``None`` = native grid), ``normalisation``
            (default ``"robust"``), ``ct_window`` (HU, default (-1000, 1000)), ``roi_size`` (classification:
            the volume is padded / centre-cropped to it).
        keys: image keys: paths (a list of paths = one multi-channel volume) → ``MetaTensor (C, X, Y, Z)``
            float32 in the normalised range.
        label_key: also a label map under this key: oriented and resampled with ``nearest`` (never
            normalised) → ``(1, X, Y, Z)`` float32 class indices. Classification: ``None`` (an int class
            needs no transform).
        native_label: with ``label_key`` and ``target_spacing``: keep ``native_label``, the label before
            resampling ``(1, X0, Y0, Z0)`` (RAS, its own affine), for native-grid metrics.
        load: ``False``: the items already hold channel-first ``MetaTensor`` volumes with their affine
            (e.g. a DICOM series read by the ingest reader); ``LoadImaged``/``EnsureChannelFirstd`` are skipped.
        track_meta: ``False`` returns plain tensors (pretraining caches); ``Invertd`` needs ``True``.

    Returns:
        A MONAI ``Compose`` of invertible / metadata-tracked transforms.

    Raises:
        MedsslError: an unknown ``task`` / ``normalisation``, a ``target_spacing`` or ``roi_size`` that is
            not 3 positive values, or an ``axcodes`` that is not 3 letters.
    """
    task = str(prep.get("task") or "segmentation")
    if task not in ("segmentation", "classification"):
        raise MedsslError(f"preprocessing task must be segmentation|classification, got {task!r}")
    axcodes = str(prep.get("axcodes") or "RAS")
    if len(axcodes) != 3:
        raise MedsslError(f"preprocessing axcodes must be 3 letters such as 'RAS', got {axcodes!r}")
    spacing = prep.get("target_spacing")
    if spacing is not None and (len(spacing) != 3 or min(float(s) for s in spacing) <= 0):
        raise MedsslError(f"preprocessing target_spacing must be 3 positive mm values or None, got {spacing!r}")
    images = list(keys)
    label = [label_key] if label_key is not None and task == "segmentation" else []
    both = images + label
    chain: list = []
    if load:
        chain += [LoadImaged(both, image_only=True), EnsureChannelFirstd(both)]
    chain.append(Orientationd(both, axcodes=axcodes, labels=ORIENTATION_LABELS))
    typed = list(both)
    if native_label and label and spacing is not None:
        chain.append(CopyItemsd(label, names=["native_label"]))
        typed.append("native_label")
    if spacing is not None:
        mode = ["bilinear"] * len(images) + ["nearest"] * len(label)
        chain.append(Spacingd(both, pixdim=tuple(float(s) for s in spacing), mode=mode))
    norm = normaliser(str(prep.get("normalisation") or "robust"), images, prep.get("ct_window") or DEFAULT_CT_WINDOW)
    if norm is not None:
        chain.append(norm)
    chain.append(EnsureTyped(typed, dtype=torch.float32, track_meta=track_meta))
    if task == "classification":
        roi = prep.get("roi_size")
        if roi is None or len(roi) != 3 or min(int(r) for r in roi) < 1:
            raise MedsslError(f"classification preprocessing needs roi_size (3 positive voxels), got {roi!r}")
        chain.append(ResizeWithPadOrCropd(images, spatial_size=tuple(int(r) for r in roi)))
    return Compose(chain)
