"""Finetuning augmentation (``FinetuneConfig.augment``): which random transforms a training crop gets.

The defaults reproduce the original behaviour (each axis flipped with p = 0.5, no intensity change). Where
orientation carries the class, switch the flips of that axis off: in MSD hippocampus (RAS after
``Orientationd``) anterior (class 1) vs posterior (class 2) lies along array axis 1, so the hippocampus
pipelines flip only axis 0 (left/right): ``augment: {flip_axes: [0]}``.

Keys (all optional; missing ones take the defaults)::

    flip_prob: 0.5           # probability of flipping each listed axis (independently)
    flip_axes: [0, 1, 2]     # array axes of (X, Y, Z) = (L/R, P/A, I/S) after RAS orientation
    intensity_scale: 0.0     # image *= 1 + U(-s, s)   (RandScaleIntensityd; 0 = off)
    intensity_shift: 0.0     # image += U(-o, o)       (RandShiftIntensityd, normalised units; 0 = off)
    intensity_prob: 0.5      # probability of each intensity transform
    rotate: 0.0              # degrees: rotation about each axis drawn from U(-r, r) (RandAffined; 0 = off)
    scale: 0.0               # zoom 1 + U(-s, s) per axis (RandAffined; 0 = off)
    spatial_prob: 0.2        # probability of the affine (rotation + zoom) of a crop
    gamma: [1.0, 1.0]        # gamma range of RandAdjustContrastd (e.g. [0.7, 1.5]; [1, 1] = off)
    gamma_prob: 0.3          # probability of the gamma change
    noise_std: 0.0           # std of additive Gaussian noise, normalised units (RandGaussianNoised; 0 = off)
    noise_prob: 0.1          # probability of the noise

The spatial and gamma / noise keys follow nnU-Net's default augmentation (Isensee et al., Nature Methods 2021:
rotation, scaling p = 0.2, gamma p = 0.3, noise p = 0.1); with few labelled cases (hippocampus at 10 % = 14
volumes) they are what keeps a U-Net from overfitting. They act on the crop (after sampling), image bilinear and
label nearest, padding 0 (background). Keys left at their "off" value are not recorded in the resolved dict, so
configurations that do not use them keep their ``medssl.config_hash``.

Segmentation crops (:func:`crop_transforms`, ``FinetuneConfig.sampling``): ``"posneg"`` centres crops on
foreground / background voxels 1:1 (``RandCropByPosNegLabeld``; a small class is drawn in proportion to its
voxels), ``"classes"`` draws the crop centre's class first with per-class ratios (``RandCropByLabelClassesd``;
default: background and each foreground class equally), so a small class (hippocampus anterior) is a crop
centre as often as a large one. When the crop covers every training volume, no sampling is needed: the volume
is padded to the crop (``"whole"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import (
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ResizeWithPadOrCropd,
    SpatialPadd,
)

__all__ = ["AUGMENT_DEFAULTS", "AUGMENT_OPTIONAL", "SAMPLINGS", "resolve_augment", "augment_transforms",
           "class_ratios", "crop_transforms", "trained_flip_axes"]

#: crop samplers of ``FinetuneConfig.sampling`` (``"whole"`` is chosen by the engine, never configured)
SAMPLINGS = ("posneg", "classes")

#: the default augmentation: today's behaviour (flip each axis with p = 0.5, no intensity change)
AUGMENT_DEFAULTS: dict[str, Any] = {
    "flip_prob": 0.5,
    "flip_axes": [0, 1, 2],
    "intensity_scale": 0.0,
    "intensity_shift": 0.0,
    "intensity_prob": 0.5,
}


#: optional keys (nnU-Net-style spatial / gamma / noise augmentation), each "off" at this value; a key at its
#: "off" value is left out of the resolved dict (hash-neutral for configurations that predate them)
AUGMENT_OPTIONAL: dict[str, Any] = {
    "rotate": 0.0,
    "scale": 0.0,
    "spatial_prob": 0.2,
    "gamma": [1.0, 1.0],
    "gamma_prob": 0.3,
    "noise_std": 0.0,
    "noise_prob": 0.1,
}


def resolve_augment(augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full augmentation dict: ``augment`` merged over :data:`AUGMENT_DEFAULTS`, validated.

    Example: ``resolve_augment({"flip_axes": [0]})`` → flips of axis 0 only, p = 0.5, no intensity change.

    Raises:
        ValueError: an unknown key (the valid ones named), a probability outside [0, 1], an axis outside
            0..2 or a negative intensity range.
    """
    given = dict(augment or {})
    valid = {**AUGMENT_DEFAULTS, **AUGMENT_OPTIONAL}
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown augment key(s) {unknown}; valid keys: {sorted(valid)}")
    out = {**AUGMENT_DEFAULTS, **{k: v for k, v in given.items() if k in AUGMENT_DEFAULTS}}
    axes = out["flip_axes"]
    if isinstance(axes, int):
        axes = [axes]
    if not isinstance(axes, Sequence) or any(int(a) not in (0, 1, 2) for a in axes):
        raise ValueError(f"augment.flip_axes must list axes in 0..2, got {out['flip_axes']!r}")
    out["flip_axes"] = sorted({int(a) for a in axes})
    for name in ("flip_prob", "intensity_prob"):
        out[name] = float(out[name])
        if not 0.0 <= out[name] <= 1.0:
            raise ValueError(f"augment.{name} must be in [0, 1], got {out[name]!r}")
    for name in ("intensity_scale", "intensity_shift"):
        out[name] = float(out[name])
        if out[name] < 0:
            raise ValueError(f"augment.{name} must be >= 0, got {out[name]!r}")
    out.update(_resolve_optional(given))
    return out


def _resolve_optional(given: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`AUGMENT_OPTIONAL` keys of ``given``, validated; keys of a transform that is off are dropped."""
    opt = {**AUGMENT_OPTIONAL, **{k: v for k, v in given.items() if k in AUGMENT_OPTIONAL}}
    for name in ("spatial_prob", "gamma_prob", "noise_prob"):
        opt[name] = float(opt[name])
        if not 0.0 <= opt[name] <= 1.0:
            raise ValueError(f"augment.{name} must be in [0, 1], got {opt[name]!r}")
    for name in ("rotate", "scale", "noise_std"):
        opt[name] = float(opt[name])
        if opt[name] < 0:
            raise ValueError(f"augment.{name} must be >= 0, got {opt[name]!r}")
    if opt["rotate"] > 180:
        raise ValueError(f"augment.rotate is in degrees and must be <= 180, got {opt['rotate']!r}")
    if opt["scale"] >= 1:
        raise ValueError(f"augment.scale must be < 1 (zoom 1 ± scale), got {opt['scale']!r}")
    g = opt["gamma"]
    if isinstance(g, (int, float)):
        g = [1.0 / float(g), float(g)] if g >= 1 else [float(g), 1.0 / float(g)]
    if not isinstance(g, Sequence) or len(g) != 2 or not 0 < float(g[0]) <= float(g[1]):
        raise ValueError(f"augment.gamma must be [low, high] with 0 < low <= high, got {opt['gamma']!r}")
    opt["gamma"] = [float(g[0]), float(g[1])]
    out: dict[str, Any] = {}
    if opt["rotate"] > 0 or opt["scale"] > 0:
        out |= {"rotate": opt["rotate"], "scale": opt["scale"], "spatial_prob": opt["spatial_prob"]}
    if opt["gamma"] != [1.0, 1.0]:
        out |= {"gamma": opt["gamma"], "gamma_prob": opt["gamma_prob"]}
    if opt["noise_std"] > 0:
        out |= {"noise_std": opt["noise_std"], "noise_prob": opt["noise_prob"]}
    return out


def trained_flip_axes(augment: Mapping[str, Any] | None) -> list[int]:
    """The axes a run's augmentation really flipped (``flip_axes`` when ``flip_prob > 0``, else none): the only axes
    test-time flips may use (finetuning's ``tta``, ``medssl predict --tta``). Missing keys count as "no flips"."""
    aug = dict(augment or {})
    return [int(a) for a in aug.get("flip_axes", [])] if float(aug.get("flip_prob", 0.0)) > 0 else []


def augment_transforms(keys: Sequence[str], augment: Mapping[str, Any] | None) -> list[Any]:
    """Random MONAI transforms of :func:`resolve_augment` ``(augment)``: flips act on every key (image and
    label stay aligned), intensity transforms on ``keys[0]`` (the image) only."""
    aug = resolve_augment(augment)
    keys = list(keys)
    out: list[Any] = []
    if aug["flip_prob"] > 0:
        out += [RandFlipd(keys, prob=aug["flip_prob"], spatial_axis=a) for a in aug["flip_axes"]]
    if aug.get("rotate", 0) > 0 or aug.get("scale", 0) > 0:
        r, z = math.radians(aug.get("rotate", 0.0)), aug.get("scale", 0.0)
        modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)  # image, then label(s)
        out.append(RandAffined(keys, prob=aug["spatial_prob"], rotate_range=(r, r, r), scale_range=(z, z, z),
                               mode=modes, padding_mode="zeros"))
    if "gamma" in aug:
        out.append(RandAdjustContrastd(keys[:1], prob=aug["gamma_prob"], gamma=tuple(aug["gamma"])))
    if aug["intensity_scale"] > 0:
        out.append(RandScaleIntensityd(keys[:1], factors=aug["intensity_scale"], prob=aug["intensity_prob"]))
    if aug["intensity_shift"] > 0:
        out.append(RandShiftIntensityd(keys[:1], offsets=aug["intensity_shift"], prob=aug["intensity_prob"]))
    if aug.get("noise_std", 0) > 0:
        out.append(RandGaussianNoised(keys[:1], prob=aug["noise_prob"], std=aug["noise_std"]))
    return out


def class_ratios(num_classes: int, ratios: Sequence[float] | None = None) -> list[float]:
    """Crop-centre class ratios for ``sampling="classes"``: ``ratios`` checked, or background and every
    foreground class equally (``num_classes=3`` → ``[1, 1, 1]``: each class a third of the crop centres).

    Raises:
        ValueError: ``ratios`` of the wrong length (``num_classes`` named), negative, or all zero.
    """
    if ratios is None:
        return [1.0] * int(num_classes)
    out = [float(r) for r in ratios]
    if len(out) != num_classes or min(out) < 0 or sum(out) <= 0:
        raise ValueError(
            f"class_ratios must be {num_classes} non-negative values (one per class incl. background, "
            f"not all 0), got {list(ratios)!r}"
        )
    return out


def crop_transforms(
    keys: Sequence[str],
    roi_size: Sequence[int],
    *,
    sampling: str = "posneg",
    num_samples: int = 2,
    num_classes: int | None = None,
    ratios: Sequence[float] | None = None,
) -> list[Any]:
    """Pad to ``roi_size`` then take ``num_samples`` crops ``(C, *roi_size)`` per volume (label key ``"label"``).

    Args:
        keys: image and label keys (cropped alike).
        roi_size: crop size in voxels ``(D, H, W)``.
        sampling: ``"posneg"`` (1:1 foreground / background centres), ``"classes"`` (centres drawn per class
            with :func:`class_ratios`) or ``"whole"`` (the crop covers every volume: pad, no sampling;
            ``num_samples`` copies of the padded volume, each augmented independently afterwards).
        num_samples: crops per volume.
        num_classes: classes incl. background (``"classes"``).
        ratios: per-class ratios (``"classes"``); ``None`` = equal.

    Raises:
        ValueError: an unknown ``sampling`` or bad ratios.
    """
    keys, roi = list(keys), tuple(int(r) for r in roi_size)
    pad = SpatialPadd(keys, spatial_size=roi)
    if sampling == "whole":  # pad (or trim a resampling's extra voxel) to exactly roi_size
        fit = ResizeWithPadOrCropd(keys, spatial_size=roi)
        if num_samples == 1:
            return [fit]
        return [fit, RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=num_samples, random_size=False)]
    if sampling == "posneg":
        return [pad, RandCropByPosNegLabeld(keys, label_key="label", spatial_size=roi, pos=1.0, neg=1.0,
                                            num_samples=num_samples)]
    if sampling == "classes":
        if num_classes is None:
            raise ValueError("sampling='classes' needs num_classes")
        return [pad, RandCropByLabelClassesd(keys, label_key="label", spatial_size=roi,
                                             ratios=class_ratios(num_classes, ratios), num_classes=num_classes,
                                             num_samples=num_samples, warn=False)]
    raise ValueError(f"sampling must be one of {(*SAMPLINGS, 'whole')}, got {sampling!r}")
