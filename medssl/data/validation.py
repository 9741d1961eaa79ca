"""Checks that every image and label map must pass before it enters a datalist.

Each check raises :class:`~medssl.errors.QuarantineError` with one specific ``reason`` and a ``detail`` that
names the offending values, so the quarantine report says what to fix.

Images (``validate_image``, arrays in NIfTI voxel order ``(X, Y, Z)``, affine voxel→RAS+ in mm):

===================== ===========================================================================
``not_3d``            2D, or 4D/5D with more than one channel/time point (one is squeezed away by
                      :func:`squeeze_to_3d`)
``too_small``         a spatial axis shorter than :data:`MIN_SPATIAL_SIZE` = 4 voxels (a slice or a
                      stack of 2-3 slices is not a 3D volume; 3D networks downsample 2-5 times)
``singular_affine``   non-finite entries, a last row other than ``[0, 0, 0, 1]``, or voxel axes that do
                      not span 3D (smallest/largest singular value of ``affine[:3, :3]`` < 1e-6)
``bad_spacing``       a voxel size (column norm of ``affine[:3, :3]``) outside
                      [:data:`MIN_SPACING_MM`, :data:`MAX_SPACING_MM`] = [0.01, 50] mm: below 10 µm is
                      beyond any CT/MR (micro-CT reaches ~5-50 µm, a unit error mm↔m is the usual cause),
                      above 50 mm is no usable tomographic slice (a cm↔mm unit error, or a placeholder)
``non_finite``        NaN or ±Inf voxels (counted)
``constant``          all voxels hold one value (blank or padding-only volume)
===================== ===========================================================================

Labels (``validate_label``): ``label_shape_mismatch``, ``label_affine_mismatch`` (grids more than
:data:`LABEL_AFFINE_TOL_MM` = 1e-3 mm apart), ``label_not_integer``, ``label_negative``,
``label_too_many_classes``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medssl.errors import QuarantineError

__all__ = [
    "LABEL_AFFINE_TOL_MM",
    "MAX_SPACING_MM",
    "MIN_SPACING_MM",
    "MIN_SPATIAL_SIZE",
    "STATS_MAX_VOXELS",
    "grid_distance_mm",
    "LABEL_LIKE_MAX_VALUES",
    "intensity_stats",
    "looks_like_label",
    "squeeze_to_3d",
    "validate_image",
    "validate_label",
]

MIN_SPATIAL_SIZE = 4
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
LABEL_AFFINE_TOL_MM = 1e-3
#: an image with at most this many distinct non-negative integer values looks like a label map
LABEL_LIKE_MAX_VALUES = 32
#: ``intensity_stats`` computes std and percentiles on a regular strided subsample above this many voxels.
STATS_MAX_VOXELS = 2_000_000


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def squeeze_to_3d(array: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Drop trailing length-1 axes beyond the third: ``(X, Y, Z, 1)`` or ``(X, Y, Z, 1, 1)`` → ``(X, Y, Z)``.

    Arrays with fewer than 3 axes are returned unchanged (``validate_image`` rejects them as ``not_3d``).

    Args:
        array: voxel array in NIfTI order ``(X, Y, Z[, T[, C]])``.
        path: the source file, for the error.

    Returns:
        A view ``(X, Y, Z)`` (no copy).

    Raises:
        QuarantineError: ``not_3d`` for 4D/5D data with more than one channel or time point.
    """
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        channels = int(np.prod(array.shape[3:]))
        raise QuarantineError(
            "not_3d", f"4D multi-channel ({channels} channels, shape {_shape(array.shape)}): split or select a "
            "channel first", path)
    return array


def _check_affine(affine: np.ndarray, path: str | Path | None) -> None:
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {affine.shape}")
    if not np.isfinite(affine).all():
        raise QuarantineError("singular_affine", "affine holds NaN/Inf entries", path)
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise QuarantineError("singular_affine", f"affine last row is {affine[3].tolist()}, not [0, 0, 0, 1]",
                              path)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    bad = (spacing < MIN_SPACING_MM) | (spacing > MAX_SPACING_MM)
    if bad.any():
        sp = ", ".join(f"{s:.4g}" for s in spacing)
        raise QuarantineError(
            "bad_spacing", f"voxel spacing ({sp}) mm outside the plausible range "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm on axis {int(np.flatnonzero(bad)[0])}", path)
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if sv[-1] < 1e-6 * sv[0]:
        raise QuarantineError("singular_affine", f"voxel axes do not span 3D (singular values "
                              f"{', '.join(f'{v:.3g}' for v in sv)})", path)


def validate_image(array: np.ndarray, affine: np.ndarray, path: str | Path | None = None) -> None:
    """Check that an image is a usable 3D volume; see the module docstring for every reason.

    Checks run cheapest first: shape, affine, then one pass over the values.

    Args:
        array: ``(X, Y, Z)`` voxel values (call :func:`squeeze_to_3d` first for ``(X, Y, Z, 1)``).
        affine: ``(4, 4)`` voxel→RAS+ affine in mm.
        path: the source, for the error.

    Raises:
        QuarantineError: ``not_3d``, ``too_small``, ``singular_affine``, ``bad_spacing``, ``non_finite``,
            ``constant``.
        ValueError: ``affine`` is not ``(4, 4)``.
    """
    if array.ndim != 3:
        what = "2D image" if array.ndim == 2 else f"{array.ndim}D array"
        detail = f"{what} of shape {_shape(array.shape)}; a 3D volume is needed"
        if array.ndim > 3:
            detail = (f"4D multi-channel ({int(np.prod(array.shape[3:]))} channels, shape "
                      f"{_shape(array.shape)}): split or select a channel first")
        raise QuarantineError("not_3d", detail, path)
    if min(array.shape) < MIN_SPATIAL_SIZE:
        raise QuarantineError("too_small", f"shape {_shape(array.shape)}: every axis needs at least "
                              f"{MIN_SPATIAL_SIZE} voxels", path)
    _check_affine(np.asarray(affine, dtype=np.float64), path)
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_bad = int(array.size - np.count_nonzero(finite))
            raise QuarantineError("non_finite", f"{n_bad} non-finite voxels ({n_nan} NaN, {n_bad - n_nan} Inf) "
                                  f"of {array.size}", path)
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise QuarantineError("constant", f"all {array.size} voxels equal {lo.item()!r}", path)


def grid_distance_mm(shape: tuple[int, ...], affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """Largest distance in mm between where two affines put the same voxel of a grid of ``shape``.

    The difference of two affine maps is affine, so its largest norm over the grid is reached at one of
    the 8 corner voxels: checking them bounds every voxel.

    Args:
        shape: spatial grid ``(X, Y, Z)``.
        affine_a: ``(4, 4)`` voxel→world in mm.
        affine_b: ``(4, 4)`` voxel→world in mm.

    Returns:
        Maximum displacement in mm (0.0 for identical affines).
    """
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    diff = (np.asarray(affine_a, np.float64) - np.asarray(affine_b, np.float64)) @ corners.T  # (4, 8)
    return float(np.sqrt((diff[:3] ** 2).sum(axis=0)).max())


def validate_label(label: np.ndarray, label_affine: np.ndarray, image_shape: tuple[int, ...],
                   image_affine: np.ndarray, path: str | Path | None = None, *, max_classes: int = 1000,
                   tolerance_mm: float = LABEL_AFFINE_TOL_MM) -> np.ndarray:
    """Check a label map against its image and return it as the smallest unsigned integer dtype.

    Float labels holding exact integers (e.g. MSD hippocampus_003, stored as float32) are converted, not
    rejected.

    Args:
        label: ``(X, Y, Z)`` class indices (call :func:`squeeze_to_3d` first).
        label_affine: ``(4, 4)`` affine of the label file, mm.
        image_shape: ``(X, Y, Z)`` of the image.
        image_affine: ``(4, 4)`` affine of the image, mm.
        path: the label file, for the error.
        max_classes: more distinct values than this means an intensity image was taken for a label.
        tolerance_mm: largest allowed displacement between the two voxel grids (see
            :func:`grid_distance_mm`); 1e-3 mm is far below any voxel size yet above float32 header
            round-off (~1e-5 mm at 1 m from the origin).

    Returns:
        The label as ``uint8`` (max ≤ 255), ``uint16`` or ``uint32``, same shape.

    Raises:
        QuarantineError: ``label_shape_mismatch``, ``label_affine_mismatch``, ``label_not_integer``,
            ``label_negative``, ``label_too_many_classes``.
    """
    if tuple(label.shape) != tuple(image_shape):
        raise QuarantineError("label_shape_mismatch", f"label shape {_shape(label.shape)} != image shape "
                              f"{_shape(image_shape)}", path)
    dist = grid_distance_mm(tuple(image_shape), label_affine, image_affine)
    if not dist <= tolerance_mm:  # also catches NaN
        raise QuarantineError("label_affine_mismatch", f"label and image grids differ by up to {dist:.4g} mm "
                              f"(tolerance {tolerance_mm:g} mm)", path)
    if label.dtype == np.bool_:
        label = label.view(np.uint8)
    if label.dtype.kind == "f":
        bad = ~np.isfinite(label)
        if not bad.any():
            bad = label != np.round(label)
        if bad.any():
            example = label[tuple(int(i[0]) for i in np.nonzero(bad))].item()
            raise QuarantineError("label_not_integer", f"{int(bad.sum())} voxels hold non-integer values, e.g. "
                                  f"{example!r}", path)
    elif label.dtype.kind not in "iu":
        raise QuarantineError("label_not_integer", f"label dtype {label.dtype} is not numeric", path)
    lo, hi = label.min().item(), label.max().item()
    if lo < 0:
        raise QuarantineError("label_negative", f"label holds negative values (min {lo:g})", path)
    if hi > np.iinfo(np.uint32).max:
        raise QuarantineError("label_too_many_classes", f"label value {hi:g} exceeds uint32", path)
    out_dtype = np.min_scalar_type(int(hi))
    out = label if label.dtype == out_dtype else label.astype(out_dtype)
    # bincount is O(N) where np.unique sorts (O(N log N)); used while the histogram stays small
    n_classes = (np.count_nonzero(np.bincount(out.ravel())) if hi <= 1 << 20 else int(np.unique(out).size))
    if n_classes > max_classes:
        raise QuarantineError("label_too_many_classes", f"{n_classes} distinct values (max {max_classes}): "
                              "is this an intensity image?", path)
    return out


def intensity_stats(array: np.ndarray) -> dict[str, float]:
    """Summary statistics of the voxel values (non-finite voxels ignored).

    ``min``/``max``/``mean`` use every voxel. ``std`` and the percentiles use a regular strided subsample
    (every k-th voxel along each axis, ``k = ceil((N / 2e6) ** (1 / ndim))``) when the array holds more than
    :data:`STATS_MAX_VOXELS` = 2M voxels. Measured on a 512×512×300 int16 volume (79M voxels, k = 4, 1.2M
    voxels kept): 0.10 s instead of 1.2 s for ``np.percentile`` on all voxels; the subsample's percentiles
    differ by sampling error only (2 HU at p0.5 and 1 HU at p1 for Gaussian noise of σ = 300 HU).

    Args:
        array: voxel values of any shape, e.g. ``(X, Y, Z)`` in HU.

    Returns:
        ``{"min", "max", "mean", "std", "p0.5", "p1", "p50", "p99", "p99.5"}`` as Python floats (NaN for an
        array without finite values).
    """
    keys = ("min", "max", "mean", "std", "p0.5", "p1", "p50", "p99", "p99.5")
    a = np.asarray(array)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        a = a[np.isfinite(a)]
    if a.size == 0:
        return {k: float("nan") for k in keys}
    sub = a
    if a.size > STATS_MAX_VOXELS:
        k = math.ceil((a.size / STATS_MAX_VOXELS) ** (1.0 / a.ndim))
        sub = a[(slice(None, None, k),) * a.ndim]
    sub = np.asarray(sub, dtype=np.float64).ravel()
    p = np.percentile(sub, [0.5, 1, 50, 99, 99.5])
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean(dtype=np.float64)),
            "std": float(sub.std()), "p0.5": float(p[0]), "p1": float(p[1]), "p50": float(p[2]),
            "p99": float(p[3]), "p99.5": float(p[4])}


def looks_like_label(array: np.ndarray, max_values: int = LABEL_LIKE_MAX_VALUES) -> list[int] | None:
    """The distinct values of an image that looks like a label map, else ``None``.

    A label map: integer values (any dtype; float32 ``0.0/1.0/2.0`` counts), none negative, at most
    ``max_values`` = 32 distinct. CT (negative HU) and MRI (hundreds of grey values) fail fast on a strided
    subsample of about 100k voxels before the full check.

    Args:
        array: ``(X, Y, Z)`` voxel values.
        max_values: most distinct values a label map is expected to hold.

    Returns:
        Sorted distinct values, e.g. ``[0, 1, 2]``, or ``None``.
    """
    a = np.asarray(array)
    if a.size == 0 or a.dtype.kind not in "biuf":
        return None
    for part in (a.ravel()[:: max(1, a.size // 100_000)], a):
        if part.dtype.kind == "f" and not (np.isfinite(part).all() and np.array_equal(part, np.round(part))):
            return None
        if part.min() < 0:
            return None
        values = np.unique(part)
        if values.size > max_values:
            return None
    return [int(v) for v in values]
