"""medssl.transforms: SSL view generation and augmentation, per-sample (MONAI dict transforms) and batched.

Per-sample: :func:`~medssl.transforms.pipelines.ssl_transforms` (``Compose`` per method) built from the
transforms below; batched on-device: :class:`~medssl.transforms.batched.BatchedSSLAugment`. Both produce the
SSL batch keys of docs/CONTRACTS.md from the same presets.
"""

from __future__ import annotations

from medssl.transforms.batched import BatchedSSLAugment
from medssl.transforms.genesis import RandBezierRemapd, RandInOutPaintd
from medssl.transforms.intensity import (
    FastRandGaussianNoised,
    FastRandGaussianSmoothd,
    HUWindow,
    HUWindowd,
    NormalizeIntensityRobust,
    NormalizeIntensityRobustd,
)
from medssl.transforms.masking import RandCuboidMaskd, RandPatchMaskd
from medssl.transforms.pipelines import (
    PRESETS,
    contrastive_views,
    restoration_view,
    rotation_view,
    ssl_transforms,
    swin_multitask_views,
)
from medssl.transforms.shuffle import RandLocalShuffled
from medssl.transforms.spatial import RandFlipAxesd, RandRotate90Labeld
from medssl.transforms.views import RandOverlapCropd

__all__ = [
    "BatchedSSLAugment",
    "FastRandGaussianNoised",
    "FastRandGaussianSmoothd",
    "HUWindow",
    "HUWindowd",
    "NormalizeIntensityRobust",
    "NormalizeIntensityRobustd",
    "PRESETS",
    "RandBezierRemapd",
    "RandCuboidMaskd",
    "RandFlipAxesd",
    "RandInOutPaintd",
    "RandLocalShuffled",
    "RandOverlapCropd",
    "RandPatchMaskd",
    "RandRotate90Labeld",
    "contrastive_views",
    "restoration_view",
    "rotation_view",
    "ssl_transforms",
    "swin_multitask_views",
]
