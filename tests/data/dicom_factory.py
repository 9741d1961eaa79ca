"""Synthetic single-frame DICOM series for tests, written with pydicom (Explicit VR Little Endian).

`write_series` stores a known volume with a chosen geometry (orientation, pixel spacing, per-slice
positions), rescale slope/intercept, file naming and PHI sentinels, so readers can be checked against
exact expectations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["PHI", "write_series", "stack_positions", "expected_affine"]

# Sentinel identifiers: a test asserts none of them leaks into outputs, reprs, errors or logs.
PHI = {"PatientName": "Sentinel^Zyxwv", "PatientID": "PID-98765-SENTINEL", "PatientBirthDate": "19230517"}


def stack_positions(origin: Sequence[float], orientation: Sequence[float], n: int,
                    steps: float | Sequence[float], shift: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Positions ``(n, 3)`` LPS mm: ``origin`` advanced along the normal by ``steps`` (+ ``shift`` per slice).

    ``shift`` adds an in-plane (or any) offset per slice index, e.g. to emulate gantry tilt.
    """
    o = np.asarray(orientation, float)
    normal = np.cross(o[:3], o[3:])
    normal /= np.linalg.norm(normal)
    st = np.full(n - 1, float(steps)) if np.isscalar(steps) else np.asarray(steps, float)
    d = np.concatenate([[0.0], np.cumsum(st)])
    k = np.arange(n)[:, None]
    return np.asarray(origin, float) + d[:, None] * normal + k * np.asarray(shift, float)


def expected_affine(origin: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float],
                    rows: int, step: float) -> np.ndarray:
    """RAS affine of the dcm2niix layout (X = columns, Y = rows bottom-up, Z = along the normal)."""
    o = np.asarray(orientation, float)
    u, v = o[:3], o[3:]
    n = np.cross(u, v)
    m = np.eye(4)
    m[:3, 0] = u * pixel_spacing[1]
    m[:3, 1] = -v * pixel_spacing[0]
    m[:3, 2] = n * step
    m[:3, 3] = np.asarray(origin, float) + (rows - 1) * pixel_spacing[0] * v
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


def _dataset(plane: np.ndarray, *, modality: str, series_uid: str, study_uid: str, frame_uid: str,
             position: np.ndarray, orientation: Sequence[float], pixel_spacing: Sequence[float],
             slope: float, intercept: float, instance: int, series_number: int,
             temporal: int | None, slice_thickness: float, tilt: float | None) -> pydicom.Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.StudyDate = "20240102"
    ds.InstitutionName = "Sentinel Hospital"
    ds.Modality = modality
    ds.Manufacturer = "medssl-factory"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{x:.6f}" for x in position]
    ds.ImageOrientationPatient = [f"{x:.8f}" for x in orientation]
    ds.PixelSpacing = [f"{x:.6f}" for x in pixel_spacing]
    ds.SliceThickness = f"{slice_thickness:g}"
    if tilt is not None:
        ds.GantryDetectorTilt = f"{tilt:g}"
    if temporal is not None:
        ds.TemporalPositionIdentifier = temporal
        ds.AcquisitionNumber = temporal
        ds.NumberOfTemporalPositions = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = plane.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    if modality == "CT":
        ds.KVP = "120"
        ds.ConvolutionKernel = "B30f"
    ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
    return ds


def write_series(folder: str | Path, values: np.ndarray, *, positions: np.ndarray,
                 orientation: Sequence[float] = (1, 0, 0, 0, 1, 0), pixel_spacing: Sequence[float] = (0.8, 0.7),
                 modality: str = "CT", slope: float = 1.0, intercept: float = -1024.0,
                 series_uid: str | None = None, series_number: int = 1, naming: str = "ordered",
                 temporal: Sequence[int] | None = None, slice_thickness: float = 2.0, tilt: float | None = None,
                 nested: bool = False, seed: int = 0) -> list[Path]:
    """Write ``values`` ``(Z, rows, cols)`` (rescaled units, e.g. HU) as one single-frame file per slice.

    Args:
        folder: output folder (created).
        values: rescaled values per slice; stored = (values - intercept) / slope as signed int16.
        positions: ``(Z, 3)`` ImagePositionPatient per slice (LPS mm), see `stack_positions`.
        orientation: ImageOrientationPatient (row cosines, column cosines).
        pixel_spacing: PixelSpacing (row spacing, column spacing) mm.
        naming: ``"ordered"`` (``IM0001.dcm``…), ``"reverse"`` (files and InstanceNumbers in reverse slice
            order), ``"shuffle"`` (random names and instance numbers), ``"noext"`` (no extension).
        temporal: per-slice TemporalPositionIdentifier (4D series), or ``None``.
        nested: spread files over two sub-folders.
        seed: RNG seed for ``"shuffle"``.

    Returns:
        Written paths in slice order of ``values``.
    """
    folder = Path(folder)
    values = np.asarray(values)
    stored = np.rint((values - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767, "values do not fit int16 storage"
    n = values.shape[0]
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    order = np.arange(n)
    if naming == "reverse":
        order = order[::-1]
    elif naming == "shuffle":
        order = rng.permutation(n)
    paths = []
    for k in range(n):
        idx = int(np.nonzero(order == k)[0][0])  # storage rank of slice k
        name = f"IM{idx + 1:04d}" + ("" if naming == "noext" else ".dcm")
        if naming == "shuffle":
            name = f"x{rng.integers(1e9):09d}_{idx}"
        sub = folder / (f"part{idx % 2}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        ds = _dataset(stored[k].astype(np.int16), modality=modality, series_uid=series_uid, study_uid=study_uid,
                      frame_uid=frame_uid, position=positions[k], orientation=orientation,
                      pixel_spacing=pixel_spacing, slope=slope, intercept=intercept, instance=idx + 1,
                      series_number=series_number, temporal=None if temporal is None else int(temporal[k]),
                      slice_thickness=slice_thickness, tilt=tilt)
        path = sub / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
