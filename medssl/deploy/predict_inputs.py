"""`medssl predict` inputs: find the cases among files/folders and read each one onto its own grid.

A case is a NIfTI file (``.nii`` / ``.nii.gz``) or one DICOM series. Folders are walked recursively: every
NIfTI file in them is a case, every DICOM series too (grouped by SeriesInstanceUID by medssl's ingest reader,
:func:`medssl.data.dicom.scan_dicom`). Reading uses the ingest readers and their quarantine rules, never a
second reader: :func:`medssl.data.nifti.load_nifti` (CRC-checked, precise reasons) and
:func:`medssl.data.dicom.load_series` (sorted along the normal, rescaled, gantry tilt / uneven spacing / missing
slices quarantined), then :func:`medssl.data.validation.validate_image` (finite, not constant, plausible
spacing). A rejected input raises ``QuarantineError`` with the ingest reason code; `medssl predict` reports
and skips it.

Case names: the NIfTI file name without its suffix; a DICOM series is named by its folder (plus
``_s<SeriesNumber>`` when the folder holds several series, ``_t<i>`` per volume of a split 4D series).
Duplicates get ``_2``, ``_3``… in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import QuarantineError

__all__ = ["PredictCase", "LoadedCase", "NIFTI_SUFFIXES", "discover_cases", "read_case"]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class PredictCase:
    """One input to predict on.

    Attributes:
        name: output name (``<out>/<name>_seg.nii.gz``).
        kind: ``"nifti"`` or ``"dicom"``.
        path: the NIfTI file, or the folder holding the series (for reports).
        series: the `DicomSeries` (frames + PHI-free label) of a DICOM case.
    """

    name: str
    kind: str
    path: Path
    series: Any = field(default=None, repr=False)


@dataclass
class LoadedCase:
    """A case read onto its own grid: what the output must match.

    Attributes:
        name: output name (a split 4D DICOM series gives one `LoadedCase` per volume, ``<name>_t<i>``).
        array: ``(C, X, Y, Z)`` float32 voxels (NIfTI voxel order; DICOM: the ingest layout).
        affine: ``(4, 4)`` voxel → RAS mm, float64: the output's affine.
        source_files: the DICOM files of the volume (empty for NIfTI).
    """

    name: str
    array: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    source_files: list[Path] = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(p: Path) -> str:
    name = p.name
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def discover_cases(inputs: Sequence[str | Path], *, exclude: str | Path | None = None
                   ) -> tuple[list[PredictCase], list[dict[str, str]]]:
    """The cases under ``inputs`` (files and folders).

    Args:
        inputs: NIfTI files, DICOM files or folders (walked recursively; hidden entries ignored).
        exclude: a folder whose NIfTI files are never cases (the output folder, when inside an input).

    Returns:
        ``(cases, problems)``: problems are ``{"input", "status", "reason", "detail"}`` rows: ``failed`` for a
        missing input, an input holding no image, or an explicitly named file that is neither NIfTI nor a
        DICOM image; ``skipped`` for unusable DICOM files found inside a folder (non-image objects such as
        SEG/SR, unreadable files), which do not stop the other series of that folder.
    """
    from medssl.data.dicom import scan_dicom

    cases: list[PredictCase] = []
    problems: list[dict[str, str]] = []
    taken: set[str] = set()
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            problems.append({"input": str(p), "status": "failed", "reason": "not_found", "detail": "no such file or folder"})
            continue
        if p.is_dir():
            niftis = sorted(f for f in p.rglob("*") if f.is_file() and _is_nifti(f) and not _excluded(f, p, exclude))
        else:
            niftis = [p] if _is_nifti(p) else []
        for f in niftis:
            cases.append(PredictCase(_unique(_stem(f), taken), "nifti", f))
        if p.is_file() and niftis:
            continue
        series, bad = scan_dicom([p])
        for e in bad:
            problems.append({"input": str(e.path or p), "status": "failed" if p.is_file() else "skipped",
                             "reason": e.reason, "detail": e.detail})
        folders: dict[Path, int] = {}
        for s in series:
            folders[_series_folder(s)] = folders.get(_series_folder(s), 0) + 1
        for s in series:
            folder = _series_folder(s)
            base = folder.name or "dicom"
            number = s.frames[0].extra.get("series_number")
            if folders[folder] > 1:
                base += f"_s{number if number is not None else len(taken)}"
            cases.append(PredictCase(_unique(base, taken), "dicom", folder, series=s))
        if not niftis and not series and not bad:
            problems.append({"input": str(p), "status": "failed", "reason": "no_image",
                             "detail": "neither a NIfTI file nor DICOM images" + (" found in the folder" if p.is_dir() else "")})
    return cases, problems


def _excluded(f: Path, root: Path, exclude: str | Path | None) -> bool:
    if any(part.startswith(".") for part in f.relative_to(root).parts):
        return True
    return exclude is not None and Path(exclude).resolve() in f.resolve().parents


def _series_folder(series: Any) -> Path:
    import os

    return Path(os.path.commonpath([str(f.parent) for f in series.files]))


def _channels_first(array: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """``(X, Y, Z[, 1…])`` or ``(X, Y, Z, C)`` → ``(C, X, Y, Z)`` float32 for a model of ``in_channels``."""
    from medssl.data.validation import squeeze_to_3d

    if in_channels == 1:
        return np.asarray(squeeze_to_3d(array, path), dtype=np.float32)[None]
    if array.ndim != 4 or array.shape[3] != in_channels:
        raise QuarantineError("channel_count_mismatch", f"shape {tuple(array.shape)}: the model needs "
                              f"{in_channels} channels as a 4D (X, Y, Z, {in_channels}) volume", path)
    return np.ascontiguousarray(np.moveaxis(np.asarray(array, dtype=np.float32), 3, 0))


def read_case(case: PredictCase, *, in_channels: int = 1) -> list[LoadedCase]:
    """Read and validate one case with the ingest readers (DICOM: ingest's default quarantine rules).

    Returns:
        One `LoadedCase` (a split 4D DICOM series: one per volume).

    Raises:
        QuarantineError: the ingest reason (``truncated_file``, ``unreadable_nifti``, ``gantry_tilt``,
            ``uneven_spacing``, ``missing_slices``, ``non_finite``, ``constant``, ``not_3d``,
            ``channel_count_mismatch``…).
    """
    from medssl.data.validation import validate_image

    if case.kind == "nifti":
        from medssl.data.nifti import load_nifti

        vol = load_nifti(case.path)
        array = _channels_first(vol.array, in_channels, case.path)
        for c in range(array.shape[0]):
            validate_image(array[c], vol.affine, case.path)
        return [LoadedCase(case.name, array, np.asarray(vol.affine, np.float64))]
    from medssl.data.dicom import load_series

    if in_channels != 1:
        raise QuarantineError("channel_count_mismatch", f"a DICOM series is one channel; the model needs {in_channels}",
                              case.path)
    volumes = load_series(case.series, workers=2)  # ingest defaults: tilt/uneven quarantined, 4D split
    out = []
    for v in volumes:
        validate_image(v.array, v.affine, case.path)
        name = case.name if v.temporal_index is None else f"{case.name}_t{v.temporal_index}"
        out.append(LoadedCase(name, np.asarray(v.array, np.float32)[None], np.asarray(v.affine, np.float64),
                              [Path(f) for f in v.source_files]))
    return out
