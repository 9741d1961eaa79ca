"""Shared DICOM records: one 2D image plane with its patient-space geometry.

Every DICOM flavour is reduced to a list of `DicomFrame`s before geometry is reasoned about:
a classic single-frame instance gives one frame, an enhanced multi-frame object gives one per
frame (per-frame functional groups), a Siemens mosaic gives one per tile.
`medssl.data.dicom_frames` produces them; `medssl.data.dicom` groups, sorts and stacks them.

Conventions: DICOM patient coordinates (LPS, mm). ``orientation`` is ImageOrientationPatient:
row direction cosine (along a row, i.e. increasing column index) then column direction cosine.
``pixel_spacing`` is PixelSpacing: (row spacing, column spacing) = (mm between rows, mm between
columns). ``pixels`` is ``(rows, cols)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DicomFrame"]


@dataclass
class DicomFrame:
    """One image plane.

    Attributes:
        path: file the plane comes from.
        series_uid: SeriesInstanceUID (grouping key; never written to outputs).
        position: ImagePositionPatient of the first transmitted pixel, ``(3,)`` mm, LPS.
        orientation: ImageOrientationPatient, ``(6,)`` (row cosines, column cosines).
        pixel_spacing: (row spacing, column spacing) in mm.
        rows: number of rows (pixels along the column direction).
        cols: number of columns (pixels along the row direction).
        load: callable returning the stored-value pixel plane ``(rows, cols)`` *after*
            RescaleSlope/Intercept (float32; HU for CT), junk high bits masked, sign applied.
        instance_number: InstanceNumber (tie-breaker only).
        frame_index: index of the frame inside its file (0 for single-frame).
        temporal_key: identifies the 3D volume this plane belongs to in a 4D series
            (e.g. temporal position, b-value/gradient, acquisition number); ``None`` for 3D.
        modality: Modality (``"CT"``, ``"MR"``…).
        slice_thickness: SliceThickness in mm, if present.
        extra: other non-PHI attributes useful for the manifest (manufacturer, kVp…).
        patient_key: ``"patient:<PatientID>"``, else ``"study:<StudyInstanceUID>"``, else ``""`` (grouping key of
            the salted ``group_id``; PHI: never written to outputs).
    """

    path: Path
    series_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    load: Callable[[], np.ndarray]
    instance_number: int = 0
    frame_index: int = 0
    temporal_key: object | None = None
    modality: str = ""
    slice_thickness: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    patient_key: str = field(default="", repr=False)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row x col`` (LPS)."""
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)
