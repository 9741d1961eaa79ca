"""90° rotations that emit the rotation class (rotation prediction, SwinUNETR pretraining).

Rotation classes (``n_classes``), for spatial axes ``(a0, a1, a2)`` of a ``(C, D, H, W)`` image:

* ``4``: ``k * 90°`` in the plane ``spatial_axes`` (default ``(0, 1)``: the axial X–Y plane of a RAS
  volume, as Tang et al. CVPR 2022), class ``k`` ∈ {0, 1, 2, 3}; ``torch.rot90(x, k, dims)``.
* ``24``: every proper rotation of the cube. Class ``4 * f + k``: first face ``f`` ∈ 0..5 is turned to
  the front (``[]``, ``rot90(1, (0,1))``, ``rot90(2, (0,1))``, ``rot90(3, (0,1))``, ``rot90(1, (0,2))``,
  ``rot90(3, (0,2))``), then ``k`` quarter turns about axis 0 (plane ``(1, 2)``). Needs a cubic view.

Class 0 is always the identity. Flips are not combined with rotations in the presets: a flip composed
with a rotation equals another rotation's flip, which would make the label ambiguous.
Other spatial augmentation (flips, small affine) uses MONAI's ``RandFlipd`` / ``RandAffined`` directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import Flip, MapTransform, RandomizableTransform, Rotate90

__all__ = ["apply_axes", "apply_axis", "interp_matrix", "rotation_ops", "rotate", "rotate_batch",
           "check_rotation_args", "RandRotate90Labeld", "RandFlipAxesd"]

Op = tuple[int, tuple[int, int]]  # (quarter turns k, spatial axes)

_FACES: tuple[tuple[Op, ...], ...] = ((), ((1, (0, 1)),), ((2, (0, 1)),), ((3, (0, 1)),), ((1, (0, 2)),),
                                      ((3, (0, 2)),))


def rotation_ops(n_classes: int, spatial_axes: Sequence[int] = (0, 1)) -> list[tuple[Op, ...]]:
    """Each class's rotation as a sequence of ``(k, spatial_axes)`` quarter turns (see module docstring)."""
    axes = (int(spatial_axes[0]), int(spatial_axes[1]))
    if n_classes == 4:
        return [((k, axes),) if k else () for k in range(4)]
    if n_classes == 24:
        return [f + (((k, (1, 2)),) if k else ()) for f in _FACES for k in range(4)]
    raise ValueError(f"n_classes must be 4 or 24, got {n_classes}")


def rotate(x: torch.Tensor, ops: Sequence[Op], lead: int) -> torch.Tensor:
    """Apply quarter turns to ``x`` whose spatial axes start at dim ``lead`` (1 for ``(C, D, H, W)``)."""
    for k, (a, b) in ops:
        x = torch.rot90(x, k, (a + lead, b + lead))
    return x


def rotate_batch(x: torch.Tensor, labels: torch.Tensor, n_classes: int,
                 spatial_axes: Sequence[int] = (0, 1)) -> torch.Tensor:
    """Rotate each sample of ``x`` ``(B, C, D, H, W)`` by its class ``labels`` ``(B,)``.

    One indexed assignment per class present (≤ ``n_classes`` iterations), no per-sample loop.
    """
    out = x.clone()
    for c, ops in enumerate(rotation_ops(n_classes, spatial_axes)):
        if not ops:
            continue
        sel = (labels == c).nonzero().flatten()
        if sel.numel():
            out[sel] = rotate(x[sel], ops, lead=2)
    return out


def interp_matrix(pos: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear-interpolation matrix ``(B, R, size)`` sampling a length-``size`` axis at ``pos`` ``(B, R)``."""
    i0 = pos.floor().long().clamp(0, size - 1)
    w = (pos - i0).clamp(0, 1)
    m = torch.zeros((*pos.shape, size), dtype=torch.float64, device=pos.device)
    m.scatter_add_(2, i0[..., None], (1 - w)[..., None])
    m.scatter_add_(2, (i0 + 1).clamp(max=size - 1)[..., None], w[..., None])
    return m.to(dtype)


def apply_axes(x: torch.Tensor, mats: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x`` ``(B, C, D, H, W)`` with each spatial axis ``a`` mapped by ``mats[a]`` ``(B, R_a, S_a)``
    (``None``: unchanged): ``y[b, c, i, j, k] = Σ M0[b,i,p] M1[b,j,q] M2[b,k,r] x[b, c, p, q, r]``.

    Three batched matmuls; used for resized crops (:func:`medssl.transforms.batched.crop_batch`) and
    separable Gaussian blur (:func:`medssl.transforms.intensity.gaussian_blur`).
    """
    for a in (2, 1, 0):
        if mats[a] is not None:
            x = apply_axis(x, a, mats[a])
    return x


def apply_axis(x: torch.Tensor, axis: int, mat: torch.Tensor) -> torch.Tensor:
    """Spatial axis ``axis`` (0..2) of ``x`` ``(B, C, D, H, W)`` mapped by ``mat`` ``(B, R, S)``."""
    b, c, d, h, w = x.shape
    r = mat.shape[1]
    if axis == 2:  # (B, C*D*H, W) @ (B, W, R)
        return torch.bmm(x.reshape(b, c * d * h, w), mat.transpose(1, 2)).view(b, c, d, h, r)
    if axis == 1:  # (B, 1, R, H) @ (B, C*D, H, W)
        return torch.matmul(mat[:, None], x.reshape(b, c * d, h, w)).view(b, c, d, r, w)
    return torch.matmul(mat[:, None], x.reshape(b, c, d, h * w)).view(b, c, r, h, w)  # (B,1,R,D) @ (B,C,D,HW)


def check_rotation_args(roi_size: Sequence[int], n_classes: int, spatial_axes: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the rotations keep ``roi_size`` (rotated axes of equal length)."""
    rotation_ops(n_classes, spatial_axes)
    axes = range(3) if n_classes == 24 else spatial_axes
    if len({int(roi_size[a]) for a in axes}) != 1:
        raise ValueError(f"{n_classes}-class rotations about axes {tuple(axes)} need equal sizes there, "
                         f"got roi_size {tuple(roi_size)}")


class RandRotate90Labeld(RandomizableTransform, MapTransform):
    """Rotate ``keys`` by a uniformly drawn rotation class and store the class under ``label_key``.

    Uses MONAI ``Rotate90`` so a ``MetaTensor``'s affine follows the rotation. All keys get the same
    rotation. The label is a 0-d long tensor (collated to ``(B,)``).

    Args:
        keys: images ``(C, D, H, W)``.
        label_key: where the class in ``[0, n_classes)`` goes, e.g. ``"view1_rot"``.
        n_classes: 4 or 24 (see module docstring).
        spatial_axes: rotation plane of the 4-class set.

    Raises:
        ValueError: unsupported ``n_classes`` or axes.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "view1_rot", n_classes: int = 4,
                 spatial_axes: Sequence[int] = (0, 1), allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_key = label_key
        self.n_classes = int(n_classes)
        self.spatial_axes = tuple(int(a) for a in spatial_axes)
        self.ops = rotation_ops(self.n_classes, self.spatial_axes)
        self.label = 0

    def randomize(self, data: Any = None) -> None:
        self.label = int(self.R.randint(self.n_classes))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if not get_track_meta() and not isinstance(img, MetaTensor):  # plain tensor: torch.rot90 directly
                d[key] = rotate(torch.as_tensor(img), self.ops[self.label], lead=1)
                continue
            for k, axes in self.ops[self.label]:
                img = Rotate90(k=k, spatial_axes=axes)(img)
            d[key] = img
        d[self.label_key] = torch.tensor(self.label, dtype=torch.long)
        return d


class RandFlipAxesd(RandomizableTransform, MapTransform):
    """Flip ``keys`` along each spatial axis independently with probability ``prob`` (3 Bernoulli draws).

    The same distribution as three ``RandFlipd(prob, spatial_axis=a)``, in one transform: plain tensors
    (meta tracking off) take one ``torch.flip`` (measured ~4x cheaper per view than three MONAI
    ``RandFlipd``); ``MetaTensor``s go through MONAI ``Flip`` so the affine follows.

    Args:
        keys: images ``(C, D, H, W)`` (all keys get the same flips).
        prob: probability of flipping each axis.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.flip_prob = float(prob)
        self.axes: list[int] = []

    def randomize(self, data: Any = None) -> None:
        self.axes = [a for a in range(3) if self.R.random_sample() < self.flip_prob]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if not self.axes:
                continue
            if not get_track_meta() and not isinstance(img, MetaTensor):
                d[key] = torch.flip(torch.as_tensor(img), [a + 1 for a in self.axes])
            else:
                d[key] = Flip(spatial_axis=self.axes)(img)
        return d
