"""DICOM discovery and series grouping: sniff files → read headers → group frames by SeriesInstanceUID.

Steps 1–2 of the `medssl.data.dicom` pipeline (which re-exports the public names): `find_dicom_files`
keeps files that look like DICOM, `scan_dicom` header-reads them (via
`medssl.data.dicom_frames.frames_from_dataset`) into `DicomSeries` with PHI-free labels.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medssl.data.dicom_types import DicomFrame
from medssl.errors import QuarantineError

__all__ = ["DICOM_SUFFIXES", "DicomSeries", "find_dicom_files", "scan_dicom"]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".dc3", ".ima"}
# Non-PHI header attributes added to the frames' ``extra`` (dicom_frames supplies manufacturer, kVp…).
_META_KEYWORDS = {"SeriesNumber": "series_number", "GantryDetectorTilt": "gantry_detector_tilt",
                  "BodyPartExamined": "body_part"}


@dataclass
class DicomSeries:
    """The frames of one SeriesInstanceUID and a PHI-free label such as ``"CT series 3 (28 files) in scans/a"``."""

    frames: list[DicomFrame] = field(repr=False)
    label: str

    @property
    def files(self) -> list[Path]:
        """Distinct source files, sorted."""
        return sorted({f.path for f in self.frames})


# ----------------------------------------------------------------------------------------- discovery
def _sniff(path: Path) -> str:
    """``"dicom"`` (preamble), ``"maybe"`` (plausible tag / extension), ``"empty"`` or ``"no"``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "no"
    if not head:
        return "empty"
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    # Preamble-less (raw) DICOM starts with a group 0x0002/0x0008 element, little endian.
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0:
        return "maybe"
    return "maybe" if path.suffix.lower() in DICOM_SUFFIXES else "no"


def _walk(paths: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """``(file, named explicitly)`` for files given directly and files found in folders."""
    out: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend((Path(root) / f, False) for f in sorted(files) if not f.startswith("."))
        elif p.is_file():
            out.append((p, True))
    return out


def find_dicom_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files under ``paths`` (files or folders, walked recursively) that look like DICOM.

    The check is cheap (reads 132 bytes). Files of any other kind (README, NIfTI…) are skipped
    silently; hidden files and folders are ignored. Empty files are kept (so that `scan_dicom` reports
    them) when named explicitly or when they carry a DICOM extension.

    Returns:
        Sorted, de-duplicated paths.
    """
    keep = []
    for f, explicit in _walk(paths):
        kind = _sniff(f)
        if kind in ("dicom", "maybe") or (kind == "empty" and (explicit or f.suffix.lower() in DICOM_SUFFIXES)):
            keep.append(f)
    return sorted(set(keep))


def _header_meta(ds: object) -> dict[str, object]:
    meta: dict[str, object] = {}
    for kw, key in _META_KEYWORDS.items():
        val = getattr(ds, kw, None)
        if val is None or val == "":
            continue
        try:
            meta[key] = int(val) if kw == "SeriesNumber" else float(val) if kw == "GantryDetectorTilt" else str(val)
        except (TypeError, ValueError):
            continue
    return meta


def _set_transfer_syntax(ds: object) -> None:
    """Raw (preamble-less) datasets lack file meta: record the encoding pydicom detected while reading."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _read_file(path: Path) -> list[DicomFrame]:
    """Header-read one file into frames; `QuarantineError` for unreadable / non-image files."""
    import pydicom

    from medssl.data.dicom_frames import frames_from_dataset  # sibling module; decoding lives there

    kind = _sniff(path)
    if kind == "empty":
        raise QuarantineError("empty_file", "zero-byte file", path)
    try:
        # Deferred reading: elements > 64 KiB (PixelData) are read from the file only when accessed.
        # Preamble-less files are read whole (they are rare) so their encoding can be recorded below.
        ds = pydicom.dcmread(path, defer_size="64 KB" if kind == "dicom" else None, force=kind != "dicom")
    except Exception as e:  # pydicom raises many types for corrupt input
        raise QuarantineError("unreadable_dicom", f"cannot parse as DICOM ({type(e).__name__})", path) from None
    if kind != "dicom":
        if not any(k in ds for k in ("SOPClassUID", "Rows", "PixelData", "SeriesInstanceUID")):
            raise QuarantineError("unreadable_dicom", "no DICOM preamble and no image attributes", path)
        _set_transfer_syntax(ds)
    try:
        frames = frames_from_dataset(ds, path)
    except QuarantineError:
        raise
    except Exception as e:
        raise QuarantineError("unreadable_dicom", f"invalid image attributes ({type(e).__name__})", path) from None
    meta = _header_meta(ds)
    for f in frames:
        for k, v in meta.items():
            f.extra.setdefault(k, v)
    return frames


def _series_label(frames: list[DicomFrame], root: Path | None) -> str:
    f0 = frames[0]
    files = {f.path for f in frames}
    folder = os.path.commonpath([str(p.parent) for p in files]) if files else ""
    if root is not None:
        try:
            folder = str(Path(folder).relative_to(root.parent)) or folder
        except ValueError:
            pass
    number = f0.extra.get("series_number")
    num = f" {number}" if number is not None else ""
    extra = f", {len(frames)} frames" if len(frames) != len(files) else ""
    return f"{f0.modality or 'DICOM'} series{num} ({len(files)} files{extra}) in {folder}"


def scan_dicom(paths: Iterable[str | Path] | str | Path, *,
               workers: int = 1) -> tuple[list[DicomSeries], list[QuarantineError]]:
    """Read the headers of every DICOM file under ``paths`` and group the frames by series.

    Args:
        paths: files and/or folders (walked recursively); a single path is accepted too.
        workers: threads reading headers in parallel (I/O bound; 1 = sequential).

    Returns:
        ``(series, quarantined)``: series sorted by label; one `QuarantineError` per unusable file
        (``unreadable_dicom``, ``empty_file``, or the frame reader's reason for non-image objects).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    files = find_dicom_files(paths)
    root = Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else None

    def one(p: Path) -> list[DicomFrame] | QuarantineError:
        try:
            return _read_file(p)
        except QuarantineError as e:
            return e

    if workers > 1 and len(files) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, files))
    else:
        results = [one(p) for p in files]
    bad = [r for r in results if isinstance(r, QuarantineError)]
    by_uid: dict[str, list[DicomFrame]] = defaultdict(list)
    for r in results:
        if not isinstance(r, QuarantineError):
            for f in r:  # files without a SeriesInstanceUID are grouped per folder
                by_uid[f.series_uid or f"no-uid:{f.path.parent}"].append(f)
    series = sorted((DicomSeries(frames=fr, label=_series_label(fr, root)) for fr in by_uid.values()),
                    key=lambda s: s.label)
    for e in bad:
        logger.info("quarantined DICOM file %s: %s", e.path, e.reason)
    logger.debug("found %d DICOM series in %d files", len(series), len(files))
    return series, bad
