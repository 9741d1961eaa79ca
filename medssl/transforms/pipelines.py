"""Ready-made per-sample SSL compositions and the per-method presets shared with the batched path.

``ssl_transforms(method, roi_size, seed, **overrides)`` maps ``{"image": (C, D, H, W)}`` (a cached,
normalised volume) to the SSL batch contract keys (docs/CONTRACTS.md) for one sample; MONAI's default
collate stacks them to ``(B, ...)``. ``BatchedSSLAugment.for_method`` takes the *same* method names and
overrides, so both paths draw from the same distribution.

Chain per view: overlap-controlled crops → flips (per axis, :class:`~medssl.transforms.spatial.RandFlipAxesd`)
→ labelled rot90 → intensity (MONAI: scale, shift, gamma, fixed-mean contrast, Gaussian blur, Gaussian
noise) →
``view{i}_target`` copy → Genesis local shuffle / Bézier remap / in-out-painting → cuboid or MAE patch
mask (``view{i}_mask``). Presets (:data:`PRESETS`) only switch stages on:

========== ======= =================================================================================
method     views   stages
========== ======= =================================================================================
simclr,    2       random-resized crops (side ×0.6–1.0, overlap 0.2–0.9), flips, intensity
triplet,
byol,
vicreg
rotation   1       crop, 4-class rot90 (``view1_rot``), mild intensity
mae        1       crop, flips, target, MAE patch mask (ratio 0.75)
genesis    1       crop, flips, target, local shuffle (p .5), Bézier (p .9), in/out-paint (p .9)
swin       2       crops (side ×0.8–1.0, overlap ≥ 0.5), rot90 + labels, target, cuboid mask 10–30 %
spark      1       crop, intensity (scale, shift, gamma, contrast), no flips; the method masks
========== ======= =================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    CopyItemsd,
    RandAdjustContrastd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
)

from medssl.transforms.genesis import RandBezierRemapd, RandInOutPaintd
from medssl.transforms.intensity import FastRandGaussianNoised, FastRandGaussianSmoothd
from medssl.transforms.masking import RandCuboidMaskd, RandPatchMaskd, check_mask_args
from medssl.transforms.shuffle import RandLocalShuffled
from medssl.transforms.spatial import RandFlipAxesd, RandRotate90Labeld, check_rotation_args
from medssl.transforms.views import RandOverlapCropd, check_view_args

__all__ = ["DEFAULTS", "PRESETS", "SSLCompose", "resolve_params", "build_transforms", "ssl_transforms",
           "contrastive_views",
           "restoration_view", "rotation_view", "swin_multitask_views"]

DEFAULTS: dict[str, Any] = {
    # views (medssl.transforms.views)
    "n_views": 1, "scale": (1.0, 1.0), "min_overlap": 0.0, "max_overlap": 1.0, "n_candidates": 16,
    "pad_value": 0.0,
    # spatial
    "flip_prob": 0.0, "n_rotations": 0, "rot_axes": (0, 1),
    # intensity: probability and range of each MONAI stage
    "scale_prob": 0.0, "scale_factor": 0.1, "shift_prob": 0.0, "shift_offset": 0.1,
    "gamma_prob": 0.0, "gamma": (0.7, 1.5), "contrast_prob": 0.0, "contrast_factor": 0.25,
    "blur_prob": 0.0, "blur_sigma": (0.25, 1.0), "noise_prob": 0.0, "noise_std": 0.05,
    # restoration pretexts
    "targets": False, "mask": "none", "mask_ratio": 0.3, "mask_fill": "zero", "cuboid_size": (0.1, 0.3),
    "max_cuboids": 256, "patch_size": None,
    "shuffle_prob": 0.0, "shuffle_ratio": 0.5, "shuffle_size": (0.03, 0.1),
    "bezier_prob": 0.0, "paint_prob": 0.0, "outpaint_prob": 0.8, "paint_boxes": 5,
}

_INTENSITY = {"scale_prob": 0.5, "shift_prob": 0.5, "gamma_prob": 0.3, "contrast_prob": 0.3, "blur_prob": 0.2,
              "noise_prob": 0.3}
_CONTRASTIVE = {"n_views": 2, "scale": (0.6, 1.0), "min_overlap": 0.2, "max_overlap": 0.9, "flip_prob": 0.5,
                **_INTENSITY}

PRESETS: dict[str, dict[str, Any]] = {
    "simclr": _CONTRASTIVE, "triplet": _CONTRASTIVE, "byol": _CONTRASTIVE, "vicreg": _CONTRASTIVE,
    "rotation": {"n_rotations": 4, "scale_prob": 0.5, "shift_prob": 0.5, "noise_prob": 0.2},
    # MAE hides tokens inside the method (medssl.methods.mae draws its own patch mask, so visible tokens
    # batch densely); the preset feeds it unmasked views. Use mask="patch" only for pixel-space inpainting.
    "mae": {"flip_prob": 0.5, "targets": True, "mask": "none"},
    "genesis": {"flip_prob": 0.5, "targets": True, "shuffle_prob": 0.5, "bezier_prob": 0.9,
                "paint_prob": 0.9},
    "swin": {"n_views": 2, "scale": (0.8, 1.0), "min_overlap": 0.5, "max_overlap": 1.0, "n_rotations": 4,
             "targets": True, "mask": "cuboid", "mask_ratio": (0.1, 0.3), "mask_fill": "noise"},
    # SparK (medssl.methods.spark) draws its own patch mask; no flips (orientation can carry the class), no
    # blur/noise (the unmasked view is the reconstruction target)
    "spark": {"flip_prob": 0.0, "mask": "none", "scale_prob": 0.5, "shift_prob": 0.5, "gamma_prob": 0.3,
              "contrast_prob": 0.3},
}


def _auto_patch(roi_size: Sequence[int]) -> tuple[int, int, int]:
    for p in (16, 8, 4, 2, 1):
        if all(int(r) % p == 0 and int(r) // p >= 2 for r in roi_size):
            return (p, p, p)
    return (1, 1, 1)


def resolve_params(method: str, roi_size: Sequence[int], **overrides: Any) -> dict[str, Any]:
    """Full parameter dict of ``method``'s preset with ``overrides`` applied and validated.

    Args:
        method: one of :data:`PRESETS`.
        roi_size: view size ``(D, H, W)`` in voxels.
        overrides: any key of :data:`DEFAULTS`, e.g. ``mask_ratio=0.6``, ``n_rotations=24``.

    Returns:
        ``{name: value}`` for every key of :data:`DEFAULTS` (``patch_size`` resolved: the largest of
        16/8/4/2 dividing every ``roi_size`` axis at least twice, unless given).

    Raises:
        ValueError: unknown method (the known ones are listed), unknown override or invalid value.
    """
    if method not in PRESETS:
        raise ValueError(f"unknown SSL method {method!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {unknown}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **PRESETS[method], **overrides}
    roi = tuple(int(r) for r in roi_size)
    check_view_args(roi, int(p["n_views"]), p["scale"], p["min_overlap"], p["max_overlap"], p["n_candidates"])
    if p["n_rotations"]:
        check_rotation_args(roi, int(p["n_rotations"]), p["rot_axes"])
    if p["mask"] not in ("none", "cuboid", "patch"):
        raise ValueError(f"mask must be none|cuboid|patch, got {p['mask']!r}")
    check_mask_args(p["mask_ratio"], p["cuboid_size"], p["mask_fill"])
    check_mask_args(p["shuffle_ratio"], p["shuffle_size"], "zero")
    p["patch_size"] = _auto_patch(roi) if p["patch_size"] is None else tuple(int(x) for x in p["patch_size"])
    if p["mask"] == "patch" and any(r % q for r, q in zip(roi, p["patch_size"], strict=True)):
        raise ValueError(f"roi_size {roi} is not divisible by patch_size {p['patch_size']}")
    for k in ("flip_prob", "scale_prob", "shift_prob", "gamma_prob", "contrast_prob", "blur_prob",
              "noise_prob", "shuffle_prob", "bezier_prob", "paint_prob", "outpaint_prob"):
        if not 0.0 <= float(p[k]) <= 1.0:
            raise ValueError(f"{k} must be a probability in [0, 1], got {p[k]}")
    return p


class SSLCompose(Compose):
    """``Compose`` that can switch MONAI meta tracking off while it runs.

    With ``track_meta=False`` every stage works on plain tensors (no ``MetaTensor`` bookkeeping):
    measured 2.4x faster per pair on 32³ hippocampus views; use it when feeding cached plain tensors
    (the pretraining cache). ``None`` leaves MONAI's global setting alone. The switch is MONAI's
    process-global flag, restored after each call (safe in DataLoader worker processes, not in
    threads that use MONAI meta tracking concurrently).
    """

    def __init__(self, transforms: Sequence[Any], track_meta: bool | None = None) -> None:
        super().__init__(list(transforms))
        self.track_meta = track_meta

    def __call__(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if self.track_meta is None:
            return super().__call__(data, *args, **kwargs)
        prev = get_track_meta()
        set_track_meta(self.track_meta)
        try:
            return super().__call__(data, *args, **kwargs)
        finally:
            set_track_meta(prev)


def build_transforms(roi_size: Sequence[int], image_key: str = "image", track_meta: bool | None = None,
                     **p: Any) -> SSLCompose:
    """The per-sample chain for explicit parameters (all keys of :data:`DEFAULTS`), unseeded."""
    p = {**DEFAULTS, **p}
    views = ["view1", "view2"][: int(p["n_views"])]
    chain: list[Any] = [RandOverlapCropd(image_key, roi_size, views, p["scale"], p["min_overlap"],
                                         p["max_overlap"], p["n_candidates"], p["pad_value"])]
    for v in views:
        if p["flip_prob"] > 0:
            chain.append(RandFlipAxesd(v, prob=p["flip_prob"]))  # = RandFlipd per axis, one transform
        if p["n_rotations"]:
            chain.append(RandRotate90Labeld(v, f"{v}_rot", p["n_rotations"], p["rot_axes"]))
        chain += _intensity(v, p)
        if p["targets"]:
            chain.append(CopyItemsd(v, names=f"{v}_target"))
        mask_key = f"{v}_mask"
        if p["shuffle_prob"] > 0:
            chain.append(RandLocalShuffled(v, p["shuffle_ratio"], p["shuffle_size"], mask_key,
                                           p["shuffle_prob"]))
        if p["bezier_prob"] > 0:
            chain.append(RandBezierRemapd(v, p["bezier_prob"]))
        if p["paint_prob"] > 0:
            chain.append(RandInOutPaintd(v, p["paint_prob"], p["outpaint_prob"], p["paint_boxes"], mask_key))
        if p["mask"] == "cuboid":
            chain.append(RandCuboidMaskd(v, p["mask_ratio"], p["cuboid_size"], p["max_cuboids"],
                                         p["mask_fill"], mask_key))
        elif p["mask"] == "patch":
            chain.append(RandPatchMaskd(v, p["mask_ratio"], p["patch_size"], p["mask_fill"], mask_key))
    return SSLCompose(chain, track_meta)


def _intensity(v: str, p: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    if p["scale_prob"] > 0:
        out.append(RandScaleIntensityd(v, factors=p["scale_factor"], prob=p["scale_prob"]))
    if p["shift_prob"] > 0:
        out.append(RandShiftIntensityd(v, offsets=p["shift_offset"], prob=p["shift_prob"]))
    if p["gamma_prob"] > 0:
        out.append(RandAdjustContrastd(v, prob=p["gamma_prob"], gamma=tuple(p["gamma"])))
    if p["contrast_prob"] > 0:
        out.append(RandScaleIntensityFixedMeand(v, prob=p["contrast_prob"], factors=p["contrast_factor"]))
    if p["blur_prob"] > 0:
        s = tuple(p["blur_sigma"])
        out.append(FastRandGaussianSmoothd(v, sigma_x=s, sigma_y=s, sigma_z=s, prob=p["blur_prob"]))
    if p["noise_prob"] > 0:
        out.append(FastRandGaussianNoised(v, prob=p["noise_prob"], mean=0.0, std=p["noise_std"]))
    return out


def ssl_transforms(method: str, roi_size: Sequence[int], seed: int = 0, image_key: str = "image",
                   track_meta: bool | None = None, **overrides: Any) -> SSLCompose:
    """Seeded per-sample chain producing ``method``'s SSL batch keys from ``{image_key: (C, D, H, W)}``.

    Args:
        method: ``simclr``, ``triplet``, ``byol``, ``vicreg``, ``rotation``, ``mae``, ``genesis``, ``swin``
            or ``spark``.
        roi_size: view size ``(D, H, W)``; e.g. ``(32, 32, 32)`` for hippocampus MRI (~35×50×40 voxels).
        seed: seed of every random transform of the chain (``Compose.set_random_state``).
        image_key: key of the cached, normalised volume.
        track_meta: ``False`` runs the chain on plain tensors (faster; see :class:`SSLCompose`), ``True``
            keeps ``MetaTensor`` affines through crops/rotations, ``None`` follows MONAI's global setting.
        overrides: keys of :data:`DEFAULTS`.

    Returns:
        A MONAI ``Compose`` (:class:`SSLCompose`); e.g. for ``"swin"``: ``view1, view2,
        view{1,2}_target, view{1,2}_mask (1, D, H, W), view{1,2}_rot`` (0-d long).

    Raises:
        ValueError: unknown method/option or invalid value.
    """
    params = resolve_params(method, roi_size, **overrides)
    return build_transforms(roi_size, image_key, track_meta, **params).set_random_state(seed=seed)


def contrastive_views(roi_size: Sequence[int], seed: int = 0, **overrides: Any) -> Compose:
    """Two overlapping, independently augmented views (SimCLR/BYOL/VICReg/triplet preset)."""
    return ssl_transforms("simclr", roi_size, seed, **overrides)


def restoration_view(roi_size: Sequence[int], kind: str = "genesis", seed: int = 0,
                     **overrides: Any) -> Compose:
    """One distorted view with ``view1_target``/``view1_mask``: ``kind`` ``"genesis"`` or ``"mae"``."""
    if kind not in ("genesis", "mae"):
        raise ValueError(f"kind must be 'genesis' or 'mae', got {kind!r}")
    return ssl_transforms(kind, roi_size, seed, **overrides)


def rotation_view(roi_size: Sequence[int], seed: int = 0, **overrides: Any) -> Compose:
    """One view rotated by a random class, ``view1_rot`` (4 classes; 24 with ``n_rotations=24``)."""
    return ssl_transforms("rotation", roi_size, seed, **overrides)


def swin_multitask_views(roi_size: Sequence[int], seed: int = 0, **overrides: Any) -> Compose:
    """SwinUNETR pretraining views (Tang et al. CVPR 2022): two crops, each rotated and cutout-masked."""
    return ssl_transforms("swin", roi_size, seed, **overrides)
