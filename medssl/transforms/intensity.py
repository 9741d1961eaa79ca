"""Intensity normalisation (cached once per volume) and batched intensity augmentation kernels.

* :class:`NormalizeIntensityRobust` / ``…d``: MRI of wildly different scales (the hippocampus set spans
  per-volume maxima from 112 to 1.7e6) → percentile clip, then ``[0, 1]`` scaling (default) or z-score.
  Multiplying a volume by any positive constant leaves the output unchanged.
* :class:`HUWindow` / ``…d``: CT Hounsfield units → ``[b_min, b_max]`` through a window, clipped.

The per-sample random intensity augmentation is MONAI's (``RandScaleIntensityd``, ``RandShiftIntensityd``,
``RandAdjustContrastd``, ``RandScaleIntensityFixedMeand``, ``RandGaussianSmoothd``, ``RandGaussianNoised``;
see :mod:`medssl.transforms.pipelines`). :func:`gaussian_blur` reproduces ``GaussianSmooth`` (``erf``
kernel, truncated at 4σ, zero padding) for a batch with per-sample σ, as three batched matmuls with banded
matrices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import (
    MapTransform,
    RandGaussianNoise,
    RandGaussianNoised,
    RandGaussianSmooth,
    RandGaussianSmoothd,
    RandomizableTransform,
    Transform,
)
from monai.utils import convert_data_type, convert_to_dst_type, convert_to_tensor

from medssl.errors import QuarantineError
from medssl.transforms.spatial import apply_axes

__all__ = ["NormalizeIntensityRobust", "NormalizeIntensityRobustd", "HUWindow", "HUWindowd", "gaussian_blur",
           "FastRandGaussianNoised", "FastRandGaussianSmoothd"]

log = logging.getLogger(__name__)


class NormalizeIntensityRobust(Transform):
    """Per-volume percentile clip, then scale to ``[0, 1]`` (``mode="scale"``) or z-score (``mode="zscore"``).

    Args:
        lower: lower percentile (e.g. 0.5 → the 0.5th percentile maps to 0).
        upper: upper percentile (e.g. 99.5 → maps to 1).
        mode: ``"scale"`` → ``(clip(x, p_lo, p_hi) - p_lo) / (p_hi - p_lo)`` in ``[0, 1]``;
            ``"zscore"`` → clipped values minus their mean, over their std.
        nonzero: compute the percentiles (and z-score statistics) over non-zero voxels only (MRI with
            zero background); the background is then mapped like any other value.
        channel_wise: statistics per channel (else over the whole image).
        max_voxels: percentiles are computed on a fixed stride subsample of at most this many voxels
            (deterministic; a 512×512×300 CT does not need 78M-voxel sorting).

    Raises:
        QuarantineError: ``non_finite`` when the image contains NaN/inf.

    A constant image (``p_hi == p_lo``) becomes zeros, with a warning.
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5, mode: str = "scale", nonzero: bool = False,
                 channel_wise: bool = True, max_voxels: int = 2_000_000) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        if mode not in ("scale", "zscore"):
            raise ValueError(f"mode must be 'scale' or 'zscore', got {mode!r}")
        self.lower, self.upper, self.mode = float(lower), float(upper), mode
        self.nonzero, self.channel_wise, self.max_voxels = nonzero, channel_wise, int(max_voxels)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        sel = flat[flat != 0] if self.nonzero else flat
        if sel.numel() == 0:
            sel = flat
        step = max(1, math.ceil(sel.numel() / self.max_voxels))
        # NumPy's partition-based percentile: torch.quantile refuses inputs over 16M elements.
        lo, hi = np.percentile(sel[::step].double().cpu().numpy(), [self.lower, self.upper])
        if hi <= lo:
            log.warning("constant image (percentiles %g..%g): normalised to zeros", lo, hi)
            return torch.zeros_like(x)
        x = x.clamp(float(lo), float(hi))
        if self.mode == "scale":
            return (x - lo) / (hi - lo)
        ref = x.reshape(-1)[flat != 0] if self.nonzero and bool((flat != 0).any()) else x.reshape(-1)
        mean, std = ref.double().mean(), ref.double().std()
        return (x - mean) / std.clamp(min=1e-12) if float(std) > 0 else x - mean

    def __call__(self, img: Any) -> Any:
        x = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        if not torch.isfinite(x).all():
            raise QuarantineError("non_finite", f"{int((~torch.isfinite(x)).sum())} NaN/inf voxels")
        x = x.float()
        out = torch.stack([self._one(c) for c in x]) if self.channel_wise else self._one(x)
        return convert_to_dst_type(out.float(), img, dtype=torch.float32)[0]


class NormalizeIntensityRobustd(MapTransform):
    """Dictionary version of :class:`NormalizeIntensityRobust` (same arguments after ``keys``)."""

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, mode: str = "scale",
                 nonzero: bool = False, channel_wise: bool = True, max_voxels: int = 2_000_000,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeIntensityRobust(lower, upper, mode, nonzero, channel_wise, max_voxels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


class HUWindow(Transform):
    """CT window: ``[a_min, a_max]`` HU → ``[b_min, b_max]``, clipped.

    Args:
        a_min: lower HU of the window (e.g. -1000, air).
        a_max: upper HU (e.g. 1000; soft tissue windows use e.g. -160..240).
        b_min: output value of ``a_min``.
        b_max: output value of ``a_max``.
        clip: clip outside the window.
    """

    def __init__(self, a_min: float = -1000.0, a_max: float = 1000.0, b_min: float = 0.0, b_max: float = 1.0,
                 clip: bool = True) -> None:
        if a_max <= a_min:
            raise ValueError(f"need a_min < a_max, got {a_min}, {a_max}")
        self.a_min, self.a_max, self.b_min, self.b_max, self.clip = a_min, a_max, b_min, b_max, clip

    def __call__(self, img: Any) -> Any:
        x = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        x = x.float()
        if self.clip:
            x = x.clamp(self.a_min, self.a_max)
        out = (x - self.a_min) / (self.a_max - self.a_min) * (self.b_max - self.b_min) + self.b_min
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class HUWindowd(MapTransform):
    """Dictionary version of :class:`HUWindow` (same arguments after ``keys``)."""

    def __init__(self, keys: KeysCollection, a_min: float = -1000.0, a_max: float = 1000.0,
                 b_min: float = 0.0, b_max: float = 1.0, clip: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(a_min, a_max, b_min, b_max, clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncated: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``x`` ``(B, C, D, H, W)``, per-sample ``sigma`` ``(B, 3)`` in voxels.

    Matches MONAI ``GaussianSmooth(sigma, approx="erf")``: kernel ``0.5 * (erf((i+½)/σ√2) - erf((i-½)/σ√2))``
    for ``|i| <= int(max(4σ, 0.5) + 0.5)``, zero padding. Each axis is one batched matmul with a banded
    ``(B, S, S)`` Toeplitz matrix (zero padding = the band cut at the edges): measured ~4x faster on CPU
    than the former grouped ``conv3d`` per axis (B=6, 32³, 1 thread), where CPU grouped 3D convolution
    with per-sample 1D kernels is slow.
    """
    sigma = sigma.to(device=x.device, dtype=torch.float64)
    tails = (torch.clamp(sigma * truncated, min=0.5) + 0.5).floor()  # (B, 3)
    mats = []
    for a in range(3):
        s = x.shape[a + 2]
        i = torch.arange(s, device=x.device, dtype=torch.float64)
        off = i[None, :] - i[:, None]  # (S, S) tap offset j - i
        t = 0.70710678118654752 / sigma[:, a, None, None]  # (B, 1, 1)
        k = (0.5 * ((t * (off + 0.5)).erf() - (t * (off - 0.5)).erf())).clamp(min=0)  # (B, S, S)
        mats.append(torch.where(off.abs()[None] <= tails[:, a, None, None], k, 0.0).to(x.dtype))
    return apply_axes(x, mats)


class _FastRandGaussianNoise(RandGaussianNoise):
    """``RandGaussianNoise`` drawing its field in float32 from a ``torch.Generator`` seeded by ``self.R``
    (``randn * std + mean``): the same distribution, measured ~5x cheaper than MONAI's float64
    ``RandomState.normal`` field cast to float32 (32³, 1 thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gen = torch.Generator()

    def randomize(self, img: Any, mean: float | None = None) -> None:
        RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return
        std = self.R.uniform(0, self.std) if self.sample_std else self.std
        mean = self.mean if mean is None else mean
        gen = self._gen.manual_seed(int(self.R.randint(0, 2**31)))  # seeded from self.R: reproducible
        noise = torch.randn(tuple(img.shape), generator=gen, dtype=torch.float32).mul_(std).add_(mean)
        self.noise = convert_data_type(noise, dtype=self.dtype)[0]


class FastRandGaussianNoised(RandGaussianNoised):
    """``RandGaussianNoised`` (same arguments) with the float32 noise of :class:`_FastRandGaussianNoise`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.rand_gaussian_noise
        self.rand_gaussian_noise = _FastRandGaussianNoise(mean=old.mean, std=old.std, prob=1.0,
                                                          dtype=old.dtype, sample_std=old.sample_std)


class _FastRandGaussianSmooth(RandGaussianSmooth):
    """``RandGaussianSmooth`` smoothing plain ``(C, D, H, W)`` tensors with :func:`gaussian_blur` (same
    ``erf`` kernel and zero padding as MONAI ``GaussianSmooth``, equal to ~1e-6; ~4x faster on CPU)."""

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        if isinstance(img, MetaTensor) or img.ndim != 4 or self.approx != "erf":
            return super().__call__(img, randomize=False)
        sigma = torch.tensor([[float(self.x), float(self.y), float(self.z)]], dtype=torch.float64)
        return gaussian_blur(img[None].float(), sigma)[0]


class FastRandGaussianSmoothd(RandGaussianSmoothd):
    """``RandGaussianSmoothd`` (same arguments); plain tensors blurred by :class:`_FastRandGaussianSmooth`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.rand_smooth
        self.rand_smooth = _FastRandGaussianSmooth(old.sigma_x, old.sigma_y, old.sigma_z, prob=1.0,
                                                   approx=old.approx)
