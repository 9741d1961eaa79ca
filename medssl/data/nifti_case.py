"""Load and check the image of one NIfTI case: one file, one file per channel, or one 4D multi-channel file.

Every channel is validated like a single image (:func:`medssl.data.validation.validate_image`), and all
channels must share the first one's shape and voxel grid (within
:data:`~medssl.data.validation.LABEL_AFFINE_TOL_MM`), else ``channel_grid_mismatch``. A 4D file whose
channel count differs from its ``dataset.json`` is ``channel_count_mismatch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.errors import QuarantineError

__all__ = ["CaseImage", "load_case_image"]


@dataclass
class CaseImage:
    """The checked channels of one case.

    Attributes:
        channels: one ``(X, Y, Z)`` array per channel, in channel order.
        affine: ``(4, 4)`` voxel→RAS affine in mm (of the first channel; the others match it).
        spacing: ``(3,)`` voxel size in mm.
        dtype: on-disk dtype of the first channel, e.g. ``"int16"``.
    """

    channels: list[np.ndarray]
    affine: np.ndarray
    spacing: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        """``(X, Y, Z)``."""
        return tuple(self.channels[0].shape)


def load_case_image(images: list[str], names: list[str] | None = None, n_channels: int = 1) -> CaseImage:
    """Read and validate the image file(s) of a case.

    Args:
        images: one file per channel (in order), or one file.
        names: channel names, for messages.
        n_channels: channels expected inside a single 4D file (``(X, Y, Z, C)``); 1 for 3D files.

    Returns:
        The :class:`CaseImage`.

    Raises:
        QuarantineError: a reading/validation reason of one channel (``path`` names its file),
            ``channel_grid_mismatch`` or ``channel_count_mismatch``.
    """
    from medssl.data.nifti import load_nifti
    from medssl.data.validation import LABEL_AFFINE_TOL_MM, grid_distance_mm, squeeze_to_3d, validate_image

    arrays: list[np.ndarray] = []
    first = None
    for i, path in enumerate(images):
        vol = load_nifti(path)
        if n_channels > 1:
            if vol.array.ndim != 4 or vol.array.shape[3] != n_channels:
                raise QuarantineError("channel_count_mismatch", f"shape {tuple(vol.array.shape)}: expected "
                                      f"(X, Y, Z, {n_channels}) for channels {', '.join(names or [])}", path)
            parts = [np.asarray(vol.array[..., c]) for c in range(n_channels)]
        else:
            parts = [squeeze_to_3d(vol.array, path)]
        for arr in parts:
            validate_image(arr, vol.affine, path)
        if first is None:
            first = vol
        else:
            what = f"channel {names[i] if names else i} ({Path(path).name}) vs {Path(images[0]).name}"
            if parts[0].shape != arrays[0].shape:
                raise QuarantineError("channel_grid_mismatch", f"{what}: shape {parts[0].shape} != "
                                      f"{arrays[0].shape}", path)
            dist = grid_distance_mm(arrays[0].shape, vol.affine, first.affine)
            if not dist <= LABEL_AFFINE_TOL_MM:
                raise QuarantineError("channel_grid_mismatch", f"{what}: voxel grids differ by up to {dist:.4g} mm",
                                      path)
        arrays += parts
    assert first is not None
    return CaseImage(channels=arrays, affine=first.affine, spacing=first.spacing, dtype=str(first.dtype))
