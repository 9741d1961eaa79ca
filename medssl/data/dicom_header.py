"""DICOM header attributes → validated frame geometry, PHI-free technical extras and temporal keys.

Helpers of `medssl.data.dicom_frames` (which re-exports the public names): image-object checks,
ImagePositionPatient / ImageOrientationPatient / PixelSpacing validation, the non-PHI ``extra``
attributes (`EXTRA_KEYWORDS`), the `DicomFrame` constructor, functional-group look-ups of enhanced
objects and the candidate temporal keys of 4D series (see `medssl.data.dicom_frames` for their precedence).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.dicom_types import DicomFrame
from medssl.errors import QuarantineError

__all__ = ["EXTRA_KEYWORDS", "NON_IMAGE_MODALITIES", "patient_key", "transfer_syntax_name"]

# Non-PHI attributes copied into DicomFrame.extra (keyword -> extra key).
EXTRA_KEYWORDS = {
    "Manufacturer": "manufacturer", "ManufacturerModelName": "model", "KVP": "kvp",
    "ConvolutionKernel": "convolution_kernel", "MagneticFieldStrength": "field_strength",
    "ImageType": "image_type", "BitsStored": "bits_stored", "PixelPaddingValue": "pixel_padding_value",
    "PhotometricInterpretation": "photometric",
}
NON_IMAGE_MODALITIES = frozenset({
    "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "PR", "KO", "REG", "FID", "RWV",
    "DOC", "PLAN", "AU", "ECG", "HD", "EPS", "RESP", "SMR", "M3D",
})
# Words of SOP class names (pydicom's UID dictionary) of objects that are not volumetric images.
_NON_IMAGE_SOP_WORDS = (
    "Structured Report", "SR Storage", "Segmentation", "Presentation State", "Key Object", "RT Structure",
    "RT Plan", "RT Dose", "RT Beams", "RT Ion", "Treatment Record", "Encapsulated", "Raw Data", "Registration",
    "Waveform", "Surface", "Fiducials", "Real World Value", "Spectroscopy",
)


def transfer_syntax_name(ds: Any) -> str:
    """Name of the dataset's transfer syntax, e.g. ``"JPEG 2000 Image Compression (Lossless Only)"``."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return "Implicit VR Little Endian (no file meta)" if uid is None else str(getattr(uid, "name", "") or uid)


# ---------------------------------------------------------------------------------------------------
# checks, geometry, extra attributes


def _what(ds: Any) -> str:
    sop = ds.get("SOPClassUID")
    parts = (str(ds.get("Modality", "") or ""), str(getattr(sop, "name", "") or "") if sop else "")
    return " / ".join(p for p in parts if p) or "unknown object"


def _check_image_object(ds: Any, path: Path) -> None:
    what = _what(ds)
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES or any(w.lower() in what.lower() for w in _NON_IMAGE_SOP_WORDS):
        raise QuarantineError("non_image_object", what, path)
    if "Rows" not in ds or "Columns" not in ds:
        raise QuarantineError("non_image_object", f"{what}: no Rows/Columns", path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise QuarantineError("color_image", f"{what}: {ds.get('PhotometricInterpretation', '?')} with "
                              f"{ds.SamplesPerPixel} samples per pixel", path)


def _floats(value: Any, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise QuarantineError("invalid_geometry", f"{what} is not {n} numbers", path) from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise QuarantineError("invalid_geometry", f"{what} needs {n} finite values, got {arr.size}", path)
    return arr


def _geometry(ipp: Any, iop: Any, spacing: Any, path: Path,
              what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Validated ``(position (3,) mm, orientation (6,), (row spacing, col spacing) mm)``."""
    named = (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop), ("PixelSpacing", spacing))
    missing = [name for name, v in named if v is None]
    if missing:
        raise QuarantineError("no_geometry", f"{what}: no {'/'.join(missing)}", path)
    pos, ori = _floats(ipp, 3, "ImagePositionPatient", path), _floats(iop, 6, "ImageOrientationPatient", path)
    sp = _floats(spacing, 2, "PixelSpacing", path)
    if np.linalg.norm(np.cross(ori[:3], ori[3:])) < 1e-3:
        raise QuarantineError("invalid_geometry", f"degenerate ImageOrientationPatient {ori.round(4).tolist()}",
                              path)
    if np.any(sp <= 0):
        raise QuarantineError("invalid_geometry", f"non-positive PixelSpacing {sp.tolist()}", path)
    return pos, ori, (float(sp[0]), float(sp[1]))


def _plain(value: Any) -> object:
    """pydicom value → str / int / float (multi-values joined with ``\\``)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    for t in (int, float):  # pydicom IS/DS subclass int/float
        if isinstance(value, t):
            return t(value)
    return str(value)


def _extra(ds: Any) -> dict[str, object]:
    """Non-PHI technical attributes (`EXTRA_KEYWORDS`) plus the transfer syntax name."""
    extra: dict[str, object] = {"transfer_syntax": transfer_syntax_name(ds)}
    extra.update({key: _plain(ds.get(kw)) for kw, key in EXTRA_KEYWORDS.items() if ds.get(kw) not in (None, "")})
    return extra


def _frame(ds: Any, path: Path, pos: np.ndarray, ori: np.ndarray, sp: tuple[float, float],
           load: Callable[[], np.ndarray], cand: dict[str, tuple], *, thickness: Any, index: int = 0,
           shape: tuple[int, int] | None = None, extra: dict[str, object] | None = None) -> DicomFrame:
    extra = dict(extra or _extra(ds))
    if cand:
        extra["temporal_candidates"] = cand
    key = next((v for k, v in cand.items() if k != "acquisition_number"), None)
    rows, cols = shape or (int(ds.Rows), int(ds.Columns))
    try:
        instance = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        instance = 0
    return DicomFrame(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or ""), position=pos,
                      orientation=ori, pixel_spacing=sp, rows=rows, cols=cols, load=load,
                      instance_number=instance, frame_index=index, temporal_key=key,
                      modality=str(ds.get("Modality", "") or ""), extra=extra,
                      slice_thickness=float(thickness) if thickness not in (None, "") else None,
                      patient_key=patient_key(ds))


#: PatientID values of anonymised exports that name no patient (fall back to the study)
_NO_PATIENT = {"", "anonymous", "anon", "removed", "unknown", "none", "n/a", "na", "0", "nopatientid"}


def patient_key(ds: Any) -> str:
    """Grouping key of the patient: ``"patient:<PatientID>"``, else ``"study:<StudyInstanceUID>"``, else ``""``.

    Placeholder PatientIDs of anonymised exports (``ANONYMOUS``, ``REMOVED``, empty…) fall back to the study, so
    unrelated patients are not merged into one group. PHI: the key is only ever hashed with the salt.
    """
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid.lower() not in _NO_PATIENT:
        return f"patient:{pid}"
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    return f"study:{study}" if study else ""


# ---------------------------------------------------------------------------------------------------
# temporal keys


def _diffusion_key(b: Any, gradient: Any) -> tuple:
    """``("diffusion", b s/mm², gx, gy, gz)``, rounded so float noise does not split volumes."""
    g = [round(float(x), 4) + 0.0 for x in (list(gradient if gradient is not None else []) + [0.0] * 3)[:3]]
    return ("diffusion", round(float(b), 2), *g)


def _classic_temporal(ds: Any, csa: dict | None) -> dict[str, tuple]:
    """Candidate temporal keys of a classic single-frame or mosaic dataset, in precedence order."""
    cand: dict[str, tuple] = {}
    if ds.get("TemporalPositionIdentifier") not in (None, ""):
        cand["temporal_position"] = ("temporal_position", int(ds.TemporalPositionIdentifier))
    if ds.get("DiffusionBValue") not in (None, ""):
        cand["diffusion"] = _diffusion_key(ds.DiffusionBValue, ds.get("DiffusionGradientOrientation"))
    elif csa is not None and _csareader().get_scalar(csa, "B_value") is not None:
        b = _csareader().get_scalar(csa, "B_value")
        cand["diffusion"] = _diffusion_key(b, _csareader().get_vector(csa, "DiffusionGradientDirection", 3)
                                           if b else None)
    elif "SIEMENS" in str(ds.get("Manufacturer", "")).upper():
        cand.update(_siemens_private_diffusion(ds))
    if ds.get("TriggerTime") not in (None, ""):
        cand["trigger_time"] = ("trigger_time", round(float(ds.TriggerTime), 3))
    if ds.get("AcquisitionNumber") not in (None, ""):
        cand["acquisition_number"] = ("acquisition_number", int(ds.AcquisitionNumber))
    return cand


def _siemens_private_diffusion(ds: Any) -> dict[str, tuple]:
    """Siemens private b-value (0019,xx0C) and gradient (0019,xx0E) of classic DWI slices."""
    try:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        b = block[0x0C].value
        g = block[0x0E].value if 0x0E in block else None
        if isinstance(b, bytes):  # implicit VR without a private dictionary entry: raw IS text
            b = b.decode(errors="ignore").strip("\x00 ")
        if isinstance(g, bytes):
            g = np.frombuffer(g, "<f8")
        return {"diffusion": _diffusion_key(b, g)}
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


# ---------------------------------------------------------------------------------------------------
# enhanced functional groups


def _fg(per: Any, shared: Any, seq: str, kw: str, top: Any = None) -> Any:
    """Attribute ``kw`` of functional group ``seq``: per-frame item, else shared item, else ``top``."""
    for groups in (per, shared):
        if groups is not None and seq in groups and len(groups[seq].value):
            item = groups[seq].value[0]
            if kw in item and item[kw].value not in (None, ""):
                return item[kw].value
    v = top.get(kw) if top is not None else None
    return v if v not in (None, "") else None


def _enhanced_temporal(per: Any, shared: Any) -> dict[str, tuple]:
    cand: dict[str, tuple] = {}
    if (tpi := _fg(per, None, "FrameContentSequence", "TemporalPositionIndex")) is not None:
        cand["temporal_position"] = ("temporal_position", int(tpi))
    if (b := _fg(per, shared, "MRDiffusionSequence", "DiffusionBValue")) is not None:
        grad = None
        for groups in (per, shared):
            diff = groups.get("MRDiffusionSequence") if groups is not None else None
            dirs = diff[0].get("DiffusionGradientDirectionSequence") if diff else None
            if dirs and grad is None:
                grad = dirs[0].get("DiffusionGradientOrientation")
        cand["diffusion"] = _diffusion_key(b, grad)
    if (tt := _fg(per, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")) is not None:
        cand["trigger_time"] = ("trigger_time", round(float(tt), 3))
    if (sid := _fg(per, None, "FrameContentSequence", "StackID")) is not None:
        cand["stack_id"] = ("stack_id", str(sid))
    # DimensionIndexValues are not used: they usually include the in-stack position, unique per frame.
    return cand


# ---------------------------------------------------------------------------------------------------
# Siemens CSA header


def _csareader() -> Any:
    """nibabel's CSA parser (importing nibabel.nicom warns that nibabel's DICOM *readers* are
    experimental; only the CSA parser is used here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader
