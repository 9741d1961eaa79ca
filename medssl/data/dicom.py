"""DICOM series reader: scan files → group by series → sort along the normal → check geometry → volume.

Pipeline (see docs/CONTRACTS.md):

1. `find_dicom_files` walks paths and keeps files that look like DICOM (128-byte preamble + ``DICM``,
   a plausible leading tag for preamble-less files, or a DICOM-like extension).
2. `scan_dicom` reads headers only (large elements such as PixelData are deferred), turns each file into
   `DicomFrame`s via `medssl.data.dicom_frames.frames_from_dataset` and groups them by SeriesInstanceUID.
   Files that look like DICOM but cannot be parsed become ``QuarantineError("unreadable_dicom")``.
3. `load_series` checks one series (`medssl.data.resample`) and stacks it into `DicomVolume`s:
   ``array`` ``(X, Y, Z)`` in NIfTI voxel order (X = columns, Y = rows bottom-up, Z = ascending position
   along the slice normal; the dcm2niix layout) with a RAS affine in mm.

PHI: UIDs are used only as grouping keys and never appear in labels, metadata, reprs, log lines or
exception messages. Series are named by folder, SeriesNumber, modality and file count.

Modules: `medssl.data.dicom_scan` (steps 1–2), `medssl.data.dicom_stack` (volume assembly); this
module holds the entry points and re-exports their public names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from medssl.data.dicom_scan import DICOM_SUFFIXES, DicomSeries, find_dicom_files, scan_dicom  # noqa: F401
from medssl.data.dicom_stack import DicomVolume, _build_volume
from medssl.data.dicom_types import DicomFrame
from medssl.data.resample import split_temporal
from medssl.errors import QuarantineError

__all__ = [
    "DicomSeries",
    "DicomVolume",
    "find_dicom_files",
    "scan_dicom",
    "load_series",
    "read_dicom_series",
    "read_dicom_files",
    "group_dicom_files",
    "save_nifti",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- entry points
def _check_options(tilt: str, uneven: str, four_d: str, target_slice_spacing: float | None) -> None:
    if tilt not in ("quarantine", "resample"):
        raise ValueError(f"tilt must be 'quarantine' or 'resample', got {tilt!r}")
    if uneven not in ("quarantine", "resample"):
        raise ValueError(f"uneven must be 'quarantine' or 'resample', got {uneven!r}")
    if four_d not in ("split", "quarantine"):
        raise ValueError(f"four_d must be 'split' or 'quarantine', got {four_d!r}")
    if target_slice_spacing is not None and not target_slice_spacing > 0:
        raise ValueError(f"target_slice_spacing must be > 0 mm, got {target_slice_spacing!r}")


def load_series(series: DicomSeries | Sequence[DicomFrame], *, tilt: str = "quarantine",
                uneven: str = "quarantine", four_d: str = "split", target_slice_spacing: float | None = None,
                workers: int = 4, decode: str = "auto") -> list[DicomVolume]:
    """Check and stack one series into one volume (or one per temporal key for 4D series).

    Args:
        series: a `DicomSeries` from `scan_dicom` (or its frames).
        tilt: gantry tilt (stacking direction not along the normal): ``"quarantine"`` (default) or
            ``"resample"`` onto a regular orthogonal grid (axes: row dir, column dir, normal).
        uneven: uneven slice steps (deviation > max(0.01 mm, 1 %) of the median step): ``"quarantine"``
            (default) or ``"resample"``. Missing slices (a step ≈ k × the median, k ≥ 2) always quarantine.
        four_d: several frames per position distinguished by ``temporal_key``: ``"split"`` into one volume
            per key (default) or ``"quarantine"`` (reason ``four_d``).
        target_slice_spacing: output step along the normal in mm when resampling (default: median
            observed step); giving it forces resampling.
        workers: threads or processes decoding slices (1 = in this thread).
        decode: ``"auto"`` (processes for compressed series of >= 8 frames when >= 4 CPUs are usable,
            else threads), ``"threads"`` or ``"processes"``.

    Returns:
        Volumes, sorted by temporal key.

    Raises:
        QuarantineError: ``mixed_orientation``, ``mixed_image_size``, ``mixed_pixel_spacing``,
            ``duplicate_slices``, ``four_d``, ``missing_slices``, ``gantry_tilt``, ``uneven_spacing``
            (several unresolved problems are joined with ``+``, e.g. ``gantry_tilt+uneven_spacing``).
        ValueError: bad option values.
    """
    _check_options(tilt, uneven, four_d, target_slice_spacing)
    frames = list(series.frames if isinstance(series, DicomSeries) else series)
    if not frames:
        raise QuarantineError("no_frames", "empty series")
    stacks = split_temporal(frames)  # raises mixed_* / duplicate_slices
    if len(stacks) > 1 and four_d == "quarantine":
        sizes = sorted({len(s) for s in stacks})
        raise QuarantineError("four_d", f"4D series: {len(stacks)} volumes of {'/'.join(map(str, sizes))} slices "
                              "(four_d='split' converts each)", frames[0].path.parent)
    if decode not in ("auto", "threads", "processes"):
        raise ValueError(f"decode must be 'auto', 'threads' or 'processes', got {decode!r}")
    opts = dict(tilt=tilt, uneven=uneven, target_slice_spacing=target_slice_spacing, workers=workers,
                decode=decode)
    if len(stacks) == 1:
        return [_build_volume(stacks[0], temporal_index=None, **opts)]
    return [_build_volume(s, temporal_index=i, **opts) for i, s in enumerate(stacks)]


def read_dicom_series(folder: str | Path, **options: object) -> list[DicomVolume]:
    """Convenience: every series under ``folder`` → volumes (strict).

    Args:
        folder: folder (or file) to scan.
        **options: passed to `load_series`.

    Raises:
        QuarantineError: when no series is found (``no_dicom_series``) or a series fails its checks.
    """
    series, bad = scan_dicom([folder])
    if not series:
        raise bad[0] if bad else QuarantineError("no_dicom_series", "no DICOM image found", folder)
    return [v for s in series for v in load_series(s, **options)]  # type: ignore[arg-type]


def read_dicom_files(files: Sequence[str | Path], **options: object) -> list[DicomVolume]:
    """The files of one series (as grouped by `group_dicom_files`) → volumes; see `load_series`.

    Unusable files among ``files`` are skipped with a warning; raises `QuarantineError` when none is usable.
    """
    series, bad = scan_dicom(list(files))
    if not series:
        raise bad[0] if bad else QuarantineError("no_dicom_series", "no DICOM image found")
    for e in bad:
        logger.warning("skipping unusable DICOM file %s (%s)", e.path, e.reason)
    return [v for s in series for v in load_series(s, **options)]  # type: ignore[arg-type]


def group_dicom_files(paths: Iterable[str | Path], *,
                      workers: int = 1) -> tuple[list[tuple[list[str], str]], list[tuple[str, str, str]]]:
    """Ingest helper: ``([(files, label) per series], [(path, reason, detail) per bad file])``."""
    series, bad = scan_dicom(list(paths), workers=workers)
    groups = [([str(p) for p in s.files], s.label) for s in series]
    return groups, [(str(e.path), e.reason, e.detail) for e in bad]


def save_nifti(volume: DicomVolume, path: str | Path) -> Path:
    """Write ``volume`` as NIfTI-1 (sform and qform = affine, code 1 scanner; units mm, s).

    ``.nii.gz`` is compressed with ISA-L (package ``isal``) when installed, else by nibabel (zlib).
    """
    import nibabel as nib

    img = nib.Nifti1Image(volume.array, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # optional: ISA-L gzip, measured 2.5x faster than zlib level 1 on a 512x512x60 int16 volume
        from isal import igzip
    except ImportError:
        igzip = None
    if igzip is not None and path.name.endswith(".gz"):
        with igzip.open(path, "wb", compresslevel=1) as fh:
            img.to_stream(fh)
    else:
        nib.save(img, path)
    return path
