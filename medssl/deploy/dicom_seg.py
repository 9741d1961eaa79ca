"""DICOM SEG from a label map on a DICOM series' grid, with highdicom, referencing the source series.

The label map is the one `medssl predict` writes for a DICOM input: ``(X, Y, Z)`` in the voxel order of
:class:`medssl.data.dicom.DicomVolume` (the ingest reader: X = columns, Y = rows bottom-up, Z = ascending
position along the slice normal) with its RAS affine. A DICOM frame, however, is ``(rows, cols)`` of one
source slice. Slice ``k`` of the volume is therefore found **from the geometry**, not from file or instance
order: each source slice's ImagePositionPatient (LPS) is mapped through the inverse affine and must land on
voxel ``(0, rows - 1, k)`` with an integer ``k`` (and the slice's row/column cosines must be the affine's
X / -Y axes). Its frame is ``labels[:, ::-1, k].T``. A series the reader resampled (gantry tilt, uneven
spacing) has no source slice per ``k`` and is refused with the reason.

Segments: one per foreground class of the model's class table (segment number = class index, so numbers mean
the same structure for every patient), named from the table, coded with SNOMED CT from pydicom's code
dictionary: a class whose name is a segmentation property type of CID 7151 (``liver`` → ``Liver``) gets that
type (category *Anatomical Structure*, or *Tissue* for tissue types); any other name gets the generic
category and type *Tissue* (`segment_codes`). A class with no voxel is still
described (a segment without frames) and listed in ``empty_classes``; ``include_empty=False`` describes only
the classes present (numbered 1..n in class order) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import MedsslError

__all__ = ["DicomSegResult", "segment_codes", "source_slice_indices", "write_dicom_seg"]

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
#: Type 2 attributes highdicom copies from the source (patient / study module); filled empty when absent
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName")
_TOL_VOXEL = 0.1  # a source slice must map to within 0.1 voxel of a grid plane


@dataclass
class DicomSegResult:
    """What `write_dicom_seg` wrote.

    Attributes:
        path: the DICOM SEG file.
        segments: per segment ``{"number", "class_index", "label", "category", "type", "frames"}`` (codes as
            ``"SCT:<value> <meaning>"``; ``frames`` = frames holding that segment).
        empty_classes: foreground class names with no voxel (described as empty segments, or left out with
            ``include_empty=False``).
        n_frames: frames in the SEG (empty frames are omitted).
        source_order: ``k`` (slice index of the label map) of each source file, in ``source_files`` order.
    """

    path: Path
    segments: list[dict[str, Any]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    n_frames: int = 0
    source_order: list[int] = field(default_factory=list)


def segment_codes(name: str) -> tuple[Any, Any]:
    """``(category, type)`` codes of a class name, from DICOM's segmentation code groups in pydicom.

    The name, CamelCased, is looked up in CID 7151 *Segmentation Property Types*: a tissue type (CID 7166:
    ``soft_tissue``, ``adipose_tissue``…) gets category *Tissue*, any other match (``liver``, ``Spleen``,
    ``hippocampus``) *Anatomical Structure*; a name that is no such type (``anterior``, ``class_1``) gets the
    generic (Tissue, Tissue) — never a qualifier such as SCT *Anterior* posing as a structure.
    """
    from pydicom.sr.codedict import codes

    key = "".join(w[:1].upper() + w[1:] for w in name.replace("-", " ").replace("_", " ").split())
    if key in codes.cid7151.dir():
        typ = getattr(codes.cid7151, key)
        return (codes.cid7150.Tissue if key in codes.cid7166.dir() else codes.cid7150.AnatomicalStructure), typ
    return codes.cid7150.Tissue, codes.cid7150.Tissue


def _code_str(code: Any) -> str:
    return f"{code.scheme_designator}:{code.value} {code.meaning}"


def source_slice_indices(datasets: Sequence[Any], affine: np.ndarray, shape: Sequence[int],
                         names: Sequence[str] | None = None) -> list[int]:
    """Slice index ``k`` of the label map for each single-frame source dataset, from its geometry.

    Args:
        datasets: pydicom headers of the source slices (ImagePositionPatient, ImageOrientationPatient, Rows,
            Columns needed).
        affine: ``(4, 4)`` voxel → RAS mm of the label map (the series' `DicomVolume` affine).
        shape: label map shape ``(X, Y, Z)`` = (columns, rows, slices).
        names: file names for error messages.

    Returns:
        ``k`` per dataset, all distinct.

    Raises:
        MedsslError: a dataset that is multi-frame, lacks geometry, has another size or orientation, or does
            not lie on a slice of the grid (a resampled series), or two datasets on one slice — naming the file.
    """
    names = list(names or [f"source #{i}" for i in range(len(datasets))])
    inv = np.linalg.inv(np.asarray(affine, float))
    x_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    y_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    out: list[int] = []
    for ds, name in zip(datasets, names, strict=True):
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise MedsslError(f"DICOM SEG: {name} is a multi-frame image; only single-frame source series are "
                              "supported")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise MedsslError(f"DICOM SEG: {name} has no ImagePositionPatient/ImageOrientationPatient")
        if (int(ds.Columns), int(ds.Rows)) != (int(shape[0]), int(shape[1])):
            raise MedsslError(f"DICOM SEG: {name} is {ds.Rows}x{ds.Columns} pixels but the label map's slices are "
                              f"{shape[1]}x{shape[0]} (was the series resampled, e.g. for gantry tilt?)")
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_ras, col_ras = iop[:3] * _LPS_TO_RAS, iop[3:] * _LPS_TO_RAS
        if float(row_ras @ x_dir) < 0.999 or float(-col_ras @ y_dir) < 0.999:
            raise MedsslError(f"DICOM SEG: the orientation of {name} does not match the label map's axes "
                              "(was the series resampled, e.g. for gantry tilt?)")
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient]) * _LPS_TO_RAS
        i, j, k = (inv @ np.append(pos, 1.0))[:3]
        kk = int(round(k))
        if abs(i) > _TOL_VOXEL or abs(j - (shape[1] - 1)) > _TOL_VOXEL or abs(k - kk) > _TOL_VOXEL \
                or not 0 <= kk < shape[2]:
            raise MedsslError(f"DICOM SEG: {name} lies at voxel ({i:.2f}, {j:.2f}, {k:.2f}) of the label map, not on "
                              f"one of its {shape[2]} slices (was the series resampled, e.g. for gantry tilt?)")
        out.append(kk)
    dup = sorted({k for k in out if out.count(k) > 1})
    if dup:
        raise MedsslError(f"DICOM SEG: several source files lie on slice(s) {dup[:5]} of the label map")
    return out


def _complete_header(ds: Any) -> None:
    """Fill what anonymised exports often blank: Type 2 patient/study attributes highdicom copies (empty), and
    SOP Class / Instance UIDs from the file meta (TotalSegmentator's example series has an empty SOPClassUID)."""
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, None)
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(key) and meta is not None and meta.get(meta_key):
            setattr(ds, key, meta.get(meta_key))


def _segment_descriptions(class_names: Mapping[str, str], classes: Sequence[int], algorithm: tuple[str, str]
                          ) -> tuple[list[Any], list[dict[str, Any]]]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    alg = hd.AlgorithmIdentificationSequence(name=algorithm[0], version=algorithm[1],
                                             family=codes.cid7162.ArtificialIntelligence)
    descs, rows = [], []
    for number, c in enumerate(classes, start=1):
        label = str(class_names.get(str(c), f"class_{c}"))
        category, typ = segment_codes(label)
        descs.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64], segmented_property_category=category,
            segmented_property_type=typ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg, tracking_id=f"medssl class {c}", tracking_uid=hd.UID()))
        rows.append({"number": number, "class_index": int(c), "label": label, "category": _code_str(category),
                     "type": _code_str(typ)})
    return descs, rows


def write_dicom_seg(labels: np.ndarray, affine: np.ndarray, source_files: Sequence[str | Path], path: str | Path, *,
                    class_names: Mapping[str, str], include_empty: bool = True,
                    algorithm: tuple[str, str] = ("medssl", "0"), series_number: int = 9901,
                    series_description: str = "medssl segmentation") -> DicomSegResult:
    """Write ``labels`` as a DICOM SEG (BINARY, one segment per foreground class) referencing the source series.

    Args:
        labels: ``(X, Y, Z)`` integer class map on the series' grid (``DicomVolume`` layout), values ``0..K-1``.
        affine: its ``(4, 4)`` RAS affine (the ``DicomVolume``'s).
        source_files: the series' single-frame DICOM files (any order).
        path: output file (``.dcm``); its folder is created.
        class_names: ``{"0": "background", "1": name, …}``; every index ``1..K-1`` is a foreground class.
        include_empty: describe classes without voxels too (default; segment number = class index).
        algorithm: ``(name, version)`` of the algorithm (AlgorithmIdentificationSequence).
        series_number: SeriesNumber of the new SEG series.
        series_description: SeriesDescription of the new SEG series.

    Returns:
        A `DicomSegResult` (segments with codes and frame counts, empty classes, source → slice mapping).

    Raises:
        MedsslError: unreadable source files, a geometry the label map does not share
            (`source_slice_indices`), or labels outside the class table — naming the file or value.
    """
    import highdicom as hd
    import pydicom

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise MedsslError(f"DICOM SEG: the label map must be (X, Y, Z), got shape {labels.shape}")
    n_classes = max(int(k) for k in class_names) + 1 if class_names else int(labels.max()) + 1
    present = sorted(int(v) for v in np.unique(labels))
    if present and (present[0] < 0 or present[-1] >= n_classes):
        raise MedsslError(f"DICOM SEG: label values {present} outside the class table 0..{n_classes - 1}")
    files = [Path(f) for f in source_files]
    try:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as e:
        raise MedsslError(f"DICOM SEG: cannot read a source file of the series: {e}") from e
    for ds in datasets:
        _complete_header(ds)
    ks = source_slice_indices(datasets, affine, labels.shape, [f.name for f in files])
    foreground = list(range(1, n_classes))
    classes = foreground if include_empty else [c for c in foreground if c in present]
    empty = [str(class_names.get(str(c), f"class_{c}")) for c in foreground if c not in present]
    if not classes:
        raise MedsslError("DICOM SEG: no foreground class to describe (the class table has only background, or "
                          "include_empty=False and the label map is empty)")
    lut = np.zeros(n_classes, dtype=np.uint16)  # class index → segment number (0 = none)
    lut[classes] = np.arange(1, len(classes) + 1)
    # frame of source slice k = labels[:, ::-1, k].T (rows top-down, columns): DicomVolume layout inverted
    planes = np.stack([labels[:, ::-1, k].T for k in ks]).astype(np.int64)
    pixel_array = lut[planes].astype(np.uint8 if len(classes) < 256 else np.uint16)
    descs, rows = _segment_descriptions(class_names, classes, algorithm)
    try:
        seg = _segmentation(hd, datasets, pixel_array, descs, algorithm, series_number, series_description)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # highdicom's checks of the source headers
        raise MedsslError(f"DICOM SEG: highdicom refused the source series in {files[0].parent} "
                          f"({type(e).__name__}: {e})") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    for row in rows:
        row["frames"] = int(sum(np.any(pixel_array == row["number"], axis=(1, 2))))
    if empty:
        log.info("DICOM SEG %s: classes without voxels: %s (%s)", path.name, ", ".join(empty),
                 "described as empty segments" if include_empty else "not described")
    return DicomSegResult(path=path, segments=rows, empty_classes=empty, n_frames=int(seg.NumberOfFrames),
                          source_order=ks)


def _segmentation(hd: Any, datasets: list[Any], pixel_array: np.ndarray, descs: list[Any], algorithm: tuple[str, str],
                  series_number: int, series_description: str) -> Any:
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medssl", manufacturer_model_name=algorithm[0],
        software_versions=algorithm[1], device_serial_number="none", series_description=series_description,
        omit_empty_frames=True)
