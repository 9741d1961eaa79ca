"""Masking pretext transforms: cuboid masks with a target ratio, MAE patch masks, local voxel shuffling.

As in :mod:`medssl.transforms.views`, the maths are pure batched functions of uniform random numbers
(``(B, ...)`` tensors); the dictionary transforms draw those numbers from their own ``self.R`` with
``B = 1``, the batched path from a ``torch.Generator``. Written here rather than with MONAI's
``RandCoarseDropoutd`` / ``RandCoarseShuffled`` because those emit no mask and have no masked-ratio target.

* Cuboid mask: up to ``max_cuboids`` boxes with sides ``U(cuboid_size) * S`` (fraction of each axis) are
  added in order until their union covers ``mask_ratio`` of the view (so the ratio is reached from
  above, by less than one box). ``mask_ratio=(0.1, 0.3)`` draws the target per sample.
* Patch mask (MAE, He et al. 2022): exactly ``round(ratio * N)`` of the ``N`` non-overlapping
  ``patch_size`` patches.
* Local shuffle (Models Genesis "local pixel shuffling", Zhou et al. 2019): ``n_blocks`` small boxes; the
  voxels of each block (where blocks overlap, the later block owns the voxel) are permuted among
  themselves, all channels alike.

Masks are ``(1, D, H, W)`` float (``(B, 1, D, H, W)`` batched), 1 where masked/distorted; transforms
that share a ``mask_key`` OR their masks, and always write it (zeros when not applied) so items collate.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = ["as_batch", "sample_boxes", "owner_map", "boxes_mask", "ratio_mask", "patch_mask", "shuffle_blocks", "fill_masked",
           "merge_mask", "RandCuboidMaskd", "RandPatchMaskd", "RandLocalShuffled"]

FILLS = ("zero", "mean", "noise")


def sample_boxes(shape: Sequence[int], size_frac: Sequence[float], u_size: torch.Tensor,
                 u_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes with side ``U(size_frac) * S`` per axis (≥ 1 voxel) and uniform position, from ``(B, K, 3)`` uniforms.

    Returns:
        ``(starts, sizes)``, each ``(B, K, 3)`` long.
    """
    s = torch.tensor([int(x) for x in shape], dtype=torch.float64, device=u_size.device)
    frac = float(size_frac[0]) + (float(size_frac[1]) - float(size_frac[0])) * u_size.double()
    sizes = torch.round(frac * s).long().clamp(min=1)
    sizes = torch.minimum(sizes, s.long())
    starts = torch.floor(u_start.double() * (s.long() - sizes + 1)).long()
    return starts, sizes


def _box(starts: torch.Tensor, sizes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(B, D, H, W)`` bool of one box per sample (``starts``/``sizes`` ``(B, 3)``)."""
    if starts.shape[0] == 1:  # per-sample path: slicing is ~10x faster than the broadcast comparison
        out = torch.zeros((1, *[int(s) for s in shape]), dtype=torch.bool, device=starts.device)
        (a, b, c), (x, y, z) = starts[0].tolist(), sizes[0].tolist()
        out[0, a:a + x, b:b + y, c:c + z] = True
        return out
    ins = []
    for a in range(3):
        r = torch.arange(int(shape[a]), device=starts.device)
        ins.append((r >= starts[:, a, None]) & (r < (starts[:, a] + sizes[:, a])[:, None]))  # (B, S_a)
    return ins[0][:, :, None, None] & ins[1][:, None, :, None] & ins[2][:, None, None, :]


def owner_map(starts: torch.Tensor, sizes: torch.Tensor, active: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Index ``k + 1`` of the last active box covering each voxel (0: none), ``(B, D, H, W)`` long.

    A loop over the ``K`` boxes, each step vectorised over ``B`` (measured faster on CPU than
    materialising ``(B, K, D, H, W)`` box masks in chunks).
    """
    owner = torch.zeros((starts.shape[0], *[int(s) for s in shape]), dtype=torch.long, device=starts.device)
    for k in range(starts.shape[1]):
        inside = _box(starts[:, k], sizes[:, k], shape) & active[:, k, None, None, None]
        owner = torch.where(inside, k + 1, owner)
    return owner


def boxes_mask(starts: torch.Tensor, sizes: torch.Tensor, active: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Union of the ``active`` ``(B, K)`` boxes, ``(B, D, H, W)`` bool."""
    return owner_map(starts, sizes, active, shape) > 0


def ratio_mask(starts: torch.Tensor, sizes: torch.Tensor, ratio: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Union of the first boxes whose coverage reaches ``ratio`` ``(B,)``; ``(B, D, H, W)`` bool."""
    b = starts.shape[0]
    union = torch.zeros((b, *[int(s) for s in shape]), dtype=torch.bool, device=starts.device)
    done = ratio.to(starts.device) <= 0
    for k in range(starts.shape[1]):
        union |= _box(starts[:, k], sizes[:, k], shape) & ~done[:, None, None, None]
        done = done | (union.flatten(1).float().mean(1) >= ratio.to(starts.device))
        if bool(done.all()):
            break
    return union


def patch_mask(noise: torch.Tensor, ratio: float, shape: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """MAE mask: the ``round(ratio * N)`` patches with the smallest ``noise`` ``(B, N)``; ``(B, D, H, W)`` bool.

    Raises:
        ValueError: ``shape`` not divisible by ``patch_size``.
    """
    grid = [int(s) // int(p) for s, p in zip(shape, patch_size, strict=True)]
    if any(int(s) % int(p) for s, p in zip(shape, patch_size, strict=True)):
        raise ValueError(f"view size {tuple(shape)} is not divisible by patch_size {tuple(patch_size)}")
    n = grid[0] * grid[1] * grid[2]
    n_mask = int(round(float(ratio) * n))
    rank = noise.argsort(1).argsort(1)  # (B, N) rank of each patch
    m = (rank < n_mask).view(-1, *grid)
    for a, p in enumerate(patch_size):
        m = m.repeat_interleave(int(p), dim=a + 1)
    return m


def shuffle_blocks(x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, keys: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Permute the voxels of each block among themselves (one argsort for the whole batch).

    Args:
        x: ``(B, C, D, H, W)``.
        starts: ``(B, K, 3)`` block starts; ``sizes``: ``(B, K, 3)`` block sizes (voxels).
        keys: ``(B, D*H*W)`` float64 uniforms; sorting them inside each block gives its permutation.

    Returns:
        ``(shuffled x, mask (B, D, H, W) bool of the blocks' union)``.
    """
    b, c, *shape = x.shape
    n = shape[0] * shape[1] * shape[2]
    group = owner_map(starts, sizes, torch.ones(starts.shape[:2], dtype=torch.bool, device=x.device), shape)
    g = group.flatten(1).double()  # (B, N): 0 = untouched
    pos = torch.arange(n, device=x.device, dtype=torch.float64) / n
    src = torch.where(g > 0, g + keys.to(x.device), g + pos).argsort(1)  # voxels of a block, shuffled
    dst = (g + pos).argsort(1)  # the same block's positions, in order
    flat = x.flatten(2)
    out = torch.empty_like(flat)
    out.scatter_(2, dst[:, None].expand(b, c, n), flat.gather(2, src[:, None].expand(b, c, n)))
    return out.view_as(x), group > 0


def fill_masked(x: torch.Tensor, mask: torch.Tensor, fill: str, u_fill: torch.Tensor | None = None) -> torch.Tensor:
    """Replace masked voxels of ``x`` ``(B, C, D, H, W)``; ``mask`` ``(B, D, H, W)`` bool.

    ``fill``: ``"zero"``; ``"mean"`` (per-sample mean of the view); ``"noise"`` (uniform in the view's
    ``[min, max]``, Models Genesis; needs ``u_fill`` ``(B, C, D, H, W)`` uniforms).
    """
    m = mask[:, None]
    if fill == "zero":
        value = torch.zeros_like(x)
    elif fill == "mean":
        value = x.mean(dim=(1, 2, 3, 4), keepdim=True).expand_as(x)
    elif fill == "noise":
        lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
        hi = x.amax(dim=(1, 2, 3, 4), keepdim=True)
        value = lo + (hi - lo) * u_fill.to(x)
    else:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    return torch.where(m, value, x)


def merge_mask(d: dict[Hashable, Any], mask_key: str | None, mask: torch.Tensor | None, like: Any) -> None:
    """OR ``mask`` (``(1, D, H, W)`` bool, or ``None`` = nothing masked) into ``d[mask_key]`` (float)."""
    if not mask_key:
        return
    shape = (1, *like.shape[1:])
    old = d.get(mask_key)
    new = torch.zeros(shape, dtype=torch.float32) if old is None else torch.as_tensor(old).float()
    if mask is not None:
        new = torch.maximum(new, mask.float().view(shape))
    d[mask_key] = new


def as_batch(img: Any) -> torch.Tensor:
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return t[None]


def _ratio(r: float | Sequence[float], u: float) -> float:
    if isinstance(r, (int, float)):
        return float(r)
    return float(r[0]) + (float(r[1]) - float(r[0])) * u


class _MaskBase(RandomizableTransform, MapTransform):
    def __init__(self, keys: KeysCollection, mask_key: str | None, prob: float, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        first = d[keys[0]]
        self.randomize(first)
        mask = None
        if self._do_transform:
            mask = self._mask(first.shape[1:])
            for key in keys:
                img = d[key]
                out = self._apply(as_batch(img), mask)[0]
                d[key] = convert_to_dst_type(out, img)[0]
        merge_mask(d, self.mask_key, mask, first)
        return d

    def _mask(self, shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandCuboidMaskd(_MaskBase):
    """Cuboid dropout / inpainting mask with a target masked ratio (see module docstring).

    Args:
        keys: images ``(C, D, H, W)`` (same mask for all keys).
        mask_ratio: target fraction of masked voxels, or a ``(lo, hi)`` range drawn per call.
            Example: ``0.3`` with 32³ views masks ≈ 9.8k voxels (a little more, never less, unless
            ``max_cuboids`` boxes do not reach it).
        cuboid_size: ``(lo, hi)`` side of each box as a fraction of the view's side, per axis.
        max_cuboids: cap on the number of boxes.
        fill: ``"zero"``, ``"mean"`` or ``"noise"`` (uniform in the view's intensity range).
        mask_key: where the ``(1, D, H, W)`` float mask goes (OR-ed with an existing one), or ``None``.
        prob: probability of masking.
    """

    def __init__(self, keys: KeysCollection, mask_ratio: float | Sequence[float] = 0.3,
                 cuboid_size: Sequence[float] = (0.1, 0.3), max_cuboids: int = 256, fill: str = "zero",
                 mask_key: str | None = "view1_mask", prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, mask_key, prob, allow_missing_keys)
        check_mask_args(mask_ratio, cuboid_size, fill)
        self.mask_ratio, self.cuboid_size = mask_ratio, tuple(cuboid_size)
        self.max_cuboids, self.fill = int(max_cuboids), fill

    def randomize(self, img: Any) -> None:
        super().randomize(None)
        if self._do_transform:
            k = self.max_cuboids
            self._u = (self.R.random_sample(), self.R.random_sample((1, k, 3)), self.R.random_sample((1, k, 3)))
            self._u_fill = self.R.random_sample((1, *img.shape)) if self.fill == "noise" else None

    def _mask(self, shape: Sequence[int]) -> torch.Tensor:
        u_r, u_size, u_start = self._u
        starts, sizes = sample_boxes(shape, self.cuboid_size, torch.from_numpy(u_size), torch.from_numpy(u_start))
        return ratio_mask(starts, sizes, torch.tensor([_ratio(self.mask_ratio, u_r)]), shape)

    def _apply(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = None if self._u_fill is None else torch.from_numpy(self._u_fill[:, : x.shape[1]])
        return fill_masked(x, mask, self.fill, u)


class RandPatchMaskd(_MaskBase):
    """MAE-style patch masking: exactly ``round(mask_ratio * N)`` of the ``N`` patches are masked.

    Args:
        keys: images ``(C, D, H, W)`` with ``D, H, W`` divisible by ``patch_size``.
        mask_ratio: fraction of patches masked, e.g. ``0.75`` (MAE).
        patch_size: patch size ``(pd, ph, pw)`` in voxels (match the ViT's patch size).
        fill: ``"zero"``, ``"mean"`` or ``"noise"``.
        mask_key: mask output key or ``None``.
        prob: probability of masking.
    """

    def __init__(self, keys: KeysCollection, mask_ratio: float = 0.75, patch_size: Sequence[int] = (16, 16, 16),
                 fill: str = "zero", mask_key: str | None = "view1_mask", prob: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, mask_key, prob, allow_missing_keys)
        if not 0.0 <= float(mask_ratio) <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        check_mask_args(mask_ratio, (0.5, 0.5), fill)
        self.mask_ratio, self.patch_size, self.fill = float(mask_ratio), tuple(int(p) for p in patch_size), fill

    def randomize(self, img: Any) -> None:
        super().randomize(None)
        if self._do_transform:
            n = 1
            for s, p in zip(img.shape[1:], self.patch_size, strict=True):
                n *= max(1, int(s) // p)
            self._noise = self.R.random_sample((1, n))
            self._u_fill = self.R.random_sample((1, *img.shape)) if self.fill == "noise" else None

    def _mask(self, shape: Sequence[int]) -> torch.Tensor:
        return patch_mask(torch.from_numpy(self._noise), self.mask_ratio, shape, self.patch_size)

    def _apply(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = None if self._u_fill is None else torch.from_numpy(self._u_fill[:, : x.shape[1]])
        return fill_masked(x, mask, self.fill, u)


class RandLocalShuffled(_MaskBase):
    """Models-Genesis local voxel shuffling inside ``n_blocks`` small random boxes.

    Args:
        keys: images ``(C, D, H, W)`` (the same permutation for every key and channel).
        n_blocks: number of blocks. Example: 32³ views, ``block_size=(0.03, 0.1)`` → 1–3 voxel sides.
        block_size: ``(lo, hi)`` block side as a fraction of the view's side.
        mask_key: mask output key (union of the blocks) or ``None``.
        prob: probability of shuffling (Genesis: 0.5).
    """

    def __init__(self, keys: KeysCollection, n_blocks: int = 200, block_size: Sequence[float] = (0.03, 0.1),
                 mask_key: str | None = "view1_mask", prob: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, mask_key, prob, allow_missing_keys)
        check_mask_args(0.0, block_size, "zero")
        self.n_blocks, self.block_size = int(n_blocks), tuple(block_size)

    def randomize(self, img: Any) -> None:
        super().randomize(None)
        if self._do_transform:
            n = int(torch.tensor(img.shape[1:]).prod())
            self._u = (self.R.random_sample((1, self.n_blocks, 3)), self.R.random_sample((1, self.n_blocks, 3)),
                       self.R.random_sample((1, n)))

    def _mask(self, shape: Sequence[int]) -> torch.Tensor:
        u_size, u_start, keys = (torch.from_numpy(u) for u in self._u)
        self._boxes = sample_boxes(shape, self.block_size, u_size, u_start)
        return boxes_mask(*self._boxes, torch.ones(1, self.n_blocks, dtype=torch.bool), shape)

    def _apply(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return shuffle_blocks(x, *self._boxes, torch.from_numpy(self._u[2]))[0]


def check_mask_args(mask_ratio: float | Sequence[float], size_frac: Sequence[float], fill: str) -> None:
    """Raise ``ValueError`` for a ratio outside ``[0, 1]``, a bad ``(lo, hi)`` size fraction or fill."""
    r = [mask_ratio] if isinstance(mask_ratio, (int, float)) else list(mask_ratio)
    if not r or len(r) > 2 or any(not 0.0 <= float(v) <= 1.0 for v in r) or float(r[0]) > float(r[-1]):
        raise ValueError(f"mask_ratio must be in [0, 1] or a (lo, hi) range there, got {mask_ratio!r}")
    if len(size_frac) != 2 or not 0.0 < float(size_frac[0]) <= float(size_frac[1]) <= 1.0:
        raise ValueError(f"size fractions must be (lo, hi) with 0 < lo <= hi <= 1, got {size_frac!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
