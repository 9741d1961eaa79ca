"""Two-view sampling: random crops of one volume with controllable scale and overlap (SimCLR / VoCo style).

The geometry is one pure function, :func:`crop_boxes`, that turns uniform random numbers into crop boxes
for a whole batch. The per-sample :class:`RandOverlapCropd` draws those numbers from its own ``self.R``
(NumPy) with ``B = 1``; the batched path (:mod:`medssl.transforms.batched`) draws them from a
``torch.Generator`` for ``B`` samples at once. Same function, same distribution.

Sampling of one sample (spatial extent ``S``, output size ``roi``):

1. each view draws an isotropic side factor ``s ~ U(scale)``; its box is ``round(roi * s)`` voxels per
   axis, clipped to ``[1, S]``;
2. view 1's start is uniform over the valid starts;
3. ``n_candidates`` placements of view 2 are built: a target overlap ``o ~ U(min_overlap, max_overlap)``
   is split over the axes as ``o = f_0 f_1 f_2`` with ``f_a = o ** w_a``, ``w ~ Dirichlet(1, 1, 1)``; along
   axis ``a`` view 2 shares ``f_a`` of the smaller box's side with view 1, on a random side. Placements
   are clipped to the volume and their overlap recomputed; the first candidate inside
   ``[min_overlap, max_overlap]`` wins, else the closest (small volumes can make the range unreachable).

Overlap is ``|A ∩ B| / min(|A|, |B|)`` (voxels): the fraction of the smaller crop seen by both views.
Example: two 32³ crops shifted by 16 voxels along one axis overlap by 0.5.
A box different from ``roi`` is resampled to ``roi`` (trilinear, ``align_corners=True``), as in
SimCLR's random-resized crop.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, RandomizableTransform, Resize, SpatialCrop, SpatialPad

__all__ = ["crop_boxes", "box_overlap", "pad_extent", "check_view_args", "RandOverlapCropd"]


def pad_extent(shape: Sequence[int], roi_size: Sequence[int]) -> tuple[int, ...]:
    """Spatial extent after centred zero-padding of a volume smaller than ``roi_size``: max(shape, roi)."""
    return tuple(max(int(s), int(r)) for s, r in zip(shape, roi_size, strict=True))


def box_overlap(start_a: torch.Tensor, size_a: torch.Tensor, start_b: torch.Tensor,
                size_b: torch.Tensor) -> torch.Tensor:
    """``|A ∩ B| / min(|A|, |B|)`` of axis-aligned boxes given as ``(..., 3)`` starts and sizes (voxels)."""
    lo = torch.maximum(start_a, start_b)
    hi = torch.minimum(start_a + size_a, start_b + size_b)
    inter = (hi - lo).clamp(min=0).prod(-1).double()
    return inter / torch.minimum(size_a.prod(-1), size_b.prod(-1)).double()


def crop_boxes(extent: torch.Tensor, roi_size: Sequence[int], scale: Sequence[float], min_overlap: float,
               max_overlap: float, u_scale: torch.Tensor, u_start1: torch.Tensor,
               u_start2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes from uniform random numbers (pure; no RNG inside).

    Args:
        extent: ``(B, 3)`` long, spatial size of each (padded) volume in voxels.
        roi_size: output size ``(D, H, W)``.
        scale: ``(lo, hi)`` range of the isotropic side factor of each box relative to ``roi_size``.
        min_overlap: lowest accepted overlap of the two views (fraction, see module docstring).
        max_overlap: highest accepted overlap.
        u_scale: ``(B, V)`` uniforms in ``[0, 1)`` for the side factors (``V`` views, 1 or 2).
        u_start1: ``(B, 3)`` uniforms for view 1's start.
        u_start2: ``(B, K, 7)`` uniforms for view 2's ``K`` candidate placements (target overlap,
            3 Dirichlet weights, 3 sides), or ``None`` when ``V == 1``.

    Returns:
        ``(starts, sizes)``, each ``(B, V, 3)`` long.
    """
    extent = extent.long()
    roi = torch.tensor([int(r) for r in roi_size], dtype=torch.float64, device=extent.device)
    s = float(scale[0]) + (float(scale[1]) - float(scale[0])) * u_scale.double()  # (B, V)
    sizes = torch.round(roi * s[..., None]).long().clamp(min=1)  # (B, V, 3)
    sizes = torch.minimum(sizes, extent[:, None, :])
    room = extent[:, None, :] - sizes + 1  # (B, V, 3) number of valid starts
    start1 = torch.floor(u_start1.double() * room[:, 0]).long()  # (B, 3)
    if sizes.shape[1] == 1:
        return start1[:, None], sizes
    cand = _placements(start1, sizes, extent, float(min_overlap), float(max_overlap), u_start2.double())
    ov = box_overlap(start1[:, None], sizes[:, :1], cand, sizes[:, 1:2])  # (B, K)
    ok = (ov >= min_overlap) & (ov <= max_overlap)
    dist = (min_overlap - ov).clamp(min=0) + (ov - max_overlap).clamp(min=0)
    k = torch.arange(ov.shape[1], device=ov.device, dtype=torch.float64)
    pick = torch.where(ok, k - ov.shape[1], dist).argmin(1)  # first accepted, else the closest
    start2 = cand[torch.arange(cand.shape[0], device=cand.device), pick]
    return torch.stack([start1, start2], 1), sizes


def _placements(start1: torch.Tensor, sizes: torch.Tensor, extent: torch.Tensor, lo: float, hi: float,
                u: torch.Tensor) -> torch.Tensor:
    """Candidate starts ``(B, K, 3)`` of view 2 for target overlaps drawn from ``u`` ``(B, K, 7)``."""
    o = (lo + (hi - lo) * u[..., 0]).clamp(min=1e-12)  # (B, K) target overlap
    e = -torch.log(u[..., 1:4].clamp(min=1e-12))
    w = e / e.sum(-1, keepdim=True)  # (B, K, 3) Dirichlet(1, 1, 1)
    f = o[..., None] ** w  # per-axis shared fraction, prod = o
    z1, z2 = sizes[:, None, 0].double(), sizes[:, None, 1].double()  # (B, 1, 3)
    shared = f * torch.minimum(z1, z2)  # (B, K, 3) voxels shared along each axis
    d = (z1 + z2) / 2 - shared  # centre distance giving that intersection
    sign = torch.where(u[..., 4:7] < 0.5, -1.0, 1.0)
    c2 = start1[:, None].double() + z1 / 2 + sign * d
    start2 = torch.round(c2 - z2 / 2).long()
    return torch.minimum(start2.clamp(min=0), (extent - sizes[:, 1])[:, None])


class RandOverlapCropd(RandomizableTransform, MapTransform):
    """Cut ``len(view_keys)`` random crops of ``keys[0]`` into new keys, with controlled scale and overlap.

    Returns one dict with ``view1``/``view2`` (not a ``list[dict]`` like ``RandSpatialCropSamplesd``):
    the SSL batch contract wants both views of a volume in one item, and MONAI's default collate then
    stacks them into ``(B, C, D, H, W)``. The source key is removed (volumes differ in size and would not
    collate) unless ``keep_source``. Crops are MONAI ``SpatialCrop`` (+ ``Resize`` when the box differs
    from ``roi_size``), so a ``MetaTensor``'s affine follows the crop.

    Args:
        keys: the source image key (one key; e.g. ``"image"``), ``(C, D, H, W)``.
        roi_size: output crop size ``(D, H, W)`` in voxels; smaller volumes are zero-padded (centred).
        view_keys: names of the views, 1 or 2 of them.
        scale: isotropic side factor range of each box relative to ``roi_size`` (``(1, 1)`` = plain crops).
        min_overlap: lowest overlap ``|A ∩ B| / min(|A|, |B|)`` of the two views, in ``[0, 1]``.
        max_overlap: highest overlap, in ``[min_overlap, 1]``.
        n_candidates: candidate placements of view 2 (the first in range wins, else the closest).
        pad_value: value of the padding.
        keep_source: keep ``keys[0]`` in the output.
        box_key: if set, also store the boxes as a ``(V, 2, 3)`` long tensor (start, size) under this key.

    Raises:
        ValueError: bad sizes, scale or overlap range.
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int],
                 view_keys: Sequence[str] = ("view1", "view2"), scale: Sequence[float] = (1.0, 1.0),
                 min_overlap: float = 0.0, max_overlap: float = 1.0, n_candidates: int = 16,
                 pad_value: float = 0.0, keep_source: bool = False, box_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        check_view_args(roi_size, len(view_keys), scale, min_overlap, max_overlap, n_candidates)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.view_keys = tuple(view_keys)
        self.scale = (float(scale[0]), float(scale[1]))
        self.min_overlap, self.max_overlap = float(min_overlap), float(max_overlap)
        self.n_candidates = int(n_candidates)
        self.pad = SpatialPad(self.roi_size, method="symmetric", value=pad_value)
        self.pad_value = float(pad_value)
        self.keep_source = keep_source
        self.box_key = box_key
        self._boxes: tuple[torch.Tensor, torch.Tensor] | None = None

    def randomize(self, extent: Sequence[int]) -> None:
        v = len(self.view_keys)
        u_scale = torch.from_numpy(self.R.random_sample((1, v)))
        u1 = torch.from_numpy(self.R.random_sample((1, 3)))
        u2 = torch.from_numpy(self.R.random_sample((1, self.n_candidates, 7))) if v == 2 else None
        self._boxes = crop_boxes(torch.tensor([list(extent)]), self.roi_size, self.scale, self.min_overlap,
                                 self.max_overlap, u_scale, u1, u2)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        if not get_track_meta() and not isinstance(d[key], MetaTensor):  # plain tensors in and out
            return self._plain(d, key)
        img = self.pad(d[key])
        self.randomize(img.shape[1:])
        starts, sizes = self._boxes
        for v, name in enumerate(self.view_keys):
            a, z = starts[0, v].tolist(), sizes[0, v].tolist()
            crop = SpatialCrop(roi_start=a, roi_end=[i + j for i, j in zip(a, z, strict=True)])(img)
            if tuple(z) != self.roi_size:
                crop = Resize(self.roi_size, mode="trilinear", align_corners=True)(crop)
            d[name] = crop
        if self.box_key:
            d[self.box_key] = torch.stack([starts[0], sizes[0]], 1)
        if not self.keep_source:
            del d[key]
        return d


    def _plain(self, d: dict[Hashable, Any], key: Hashable) -> dict[Hashable, Any]:
        """:meth:`__call__` for a plain tensor: the same padding, boxes and resampling as ``SpatialPad`` →
        ``SpatialCrop`` → ``Resize`` (which calls ``F.interpolate`` the same way) without the MONAI objects'
        per-call overhead (measured ~3x faster crop stage for 32³ views)."""
        img = torch.as_tensor(d[key])
        ext = pad_extent(img.shape[1:], self.roi_size)
        lo = [(e - s) // 2 for e, s in zip(ext, img.shape[1:], strict=True)]
        self.randomize(ext)
        starts, sizes = self._boxes
        for v, name in enumerate(self.view_keys):
            a, z = starts[0, v].tolist(), sizes[0, v].tolist()
            src = [slice(max(a[i] - lo[i], 0), min(a[i] + z[i] - lo[i], img.shape[i + 1])) for i in range(3)]
            crop = img[:, src[0], src[1], src[2]]
            if list(crop.shape[1:]) != z:  # the box reaches into the padding
                out = img.new_full((img.shape[0], *z), self.pad_value)
                dst = [slice(sl.start - (a[i] - lo[i]), sl.stop - (a[i] - lo[i])) for i, sl in enumerate(src)]
                out[:, dst[0], dst[1], dst[2]] = crop
                crop = out
            if tuple(z) != self.roi_size:
                crop = F.interpolate(crop[None], size=self.roi_size, mode="trilinear", align_corners=True)[0]
            d[name] = crop.clone() if crop._base is img or crop is img else crop  # own its memory
        if self.box_key:
            d[self.box_key] = torch.stack([starts[0], sizes[0]], 1)
        if not self.keep_source:
            del d[key]
        return d


def check_view_args(roi_size: Sequence[int], n_views: int, scale: Sequence[float], min_overlap: float,
                    max_overlap: float, n_candidates: int) -> None:
    """Validate crop arguments (shared with the batched path); raise ``ValueError`` naming the bad one."""
    if len(roi_size) != 3 or any(int(r) < 1 for r in roi_size):
        raise ValueError(f"roi_size must be 3 positive ints, got {roi_size!r}")
    if n_views not in (1, 2):
        raise ValueError(f"1 or 2 views are supported, got {n_views}")
    if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
    if not 0.0 <= float(min_overlap) <= float(max_overlap) <= 1.0:
        raise ValueError(f"need 0 <= min_overlap <= max_overlap <= 1, got {min_overlap}, {max_overlap}")
    if int(n_candidates) < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")

