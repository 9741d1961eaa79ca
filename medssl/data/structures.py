"""Merge per-structure binary masks (TotalSegmentator ``segmentations/liver.nii.gz``, ``spleen.nii.gz`` …) into
one label map with a class table shared by every case of an ingest.

The class table is the sorted union of the structure names of all cases (:func:`class_table`), so one
structure has one class index across the whole datalist: ``{"liver": 1, "spleen": 2}`` → label value 1 is
liver in every case, also in a case that has no spleen mask. A case is quarantined, never half-merged, when
a mask does not sit on the image grid (``structure_grid_mismatch``), holds values other than 0/1
(``structure_not_binary``), or two masks claim one voxel (``structure_overlap``, naming both structures
and the voxel count).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medssl.errors import QuarantineError

__all__ = ["class_table", "label_names", "merge_structures"]


def class_table(structure_sets: Iterable[Iterable[str]]) -> dict[str, int]:
    """``{structure name: class index}``, indices ``1 … N`` over the sorted union of names (0 = background).

    Example:
        >>> class_table([["spleen", "liver"], ["liver", "aorta"]])
        {'aorta': 1, 'liver': 2, 'spleen': 3}
    """
    names = sorted({name for names in structure_sets for name in names})
    return {name: i + 1 for i, name in enumerate(names)}


def label_names(table: Mapping[str, int]) -> dict[str, str]:
    """The datalist / ``labels.json`` form: ``{"0": "background", "1": "aorta", …}``."""
    return {"0": "background"} | {str(i): name for name, i in sorted(table.items(), key=lambda kv: kv[1])}


def merge_structures(masks: Mapping[str, str | Path], table: Mapping[str, int], image_shape: tuple[int, ...],
                     image_affine: np.ndarray) -> np.ndarray:
    """Load and merge one case's structure masks.

    Args:
        masks: ``{structure name: mask file}``; every name must be in ``table``.
        table: :func:`class_table` of the ingest.
        image_shape: ``(X, Y, Z)`` of the case's image.
        image_affine: ``(4, 4)`` voxel→RAS affine of the image, mm.

    Returns:
        ``(X, Y, Z)`` label map, ``uint8`` (``uint16`` beyond 255 classes), 0 = background.

    Raises:
        QuarantineError: ``structure_grid_mismatch``, ``structure_not_binary``, ``structure_overlap``, or a
            read error of a mask (``truncated_file``…); ``path`` is the offending mask.
    """
    from medssl.data.nifti import load_nifti
    from medssl.data.validation import LABEL_AFFINE_TOL_MM, grid_distance_mm, squeeze_to_3d

    dtype = np.uint8 if max(table.values(), default=0) <= 255 else np.uint16
    merged = np.zeros(tuple(image_shape), dtype)
    owner: dict[int, str] = {}
    for name in sorted(masks, key=lambda n: table[n]):
        path = masks[name]
        vol = load_nifti(path)
        mask = squeeze_to_3d(vol.array, path)
        if tuple(mask.shape) != tuple(image_shape):
            raise QuarantineError("structure_grid_mismatch", f"mask {name} has shape {tuple(mask.shape)}, the "
                                  f"image {tuple(image_shape)}", path)
        dist = grid_distance_mm(tuple(image_shape), vol.affine, image_affine)
        if not dist <= LABEL_AFFINE_TOL_MM:
            raise QuarantineError("structure_grid_mismatch", f"mask {name} and the image grid differ by up to "
                                  f"{dist:.4g} mm", path)
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise QuarantineError("structure_not_binary", f"mask {name} holds values {values[:8].tolist()}, "
                                  "expected 0/1", path)
        on = mask == 1
        clash = merged[on]
        if clash.any():
            other_idx = int(np.bincount(clash[clash > 0]).argmax())
            other = owner[other_idx]
            raise QuarantineError("structure_overlap", f"masks {other} and {name} overlap in "
                                  f"{int(np.count_nonzero(clash))} voxels", path)
        merged[on] = table[name]
        owner[table[name]] = name
    return merged
