"""Every DICOM flavour → `DicomFrame`s: pixel decoding, value rescaling and per-plane geometry.

`frames_from_dataset` turns one parsed file into 2D planes with LPS geometry:

* classic single-frame image (CT/MR/PT Image Storage…): one frame;
* enhanced multi-frame object (Enhanced CT/MR…): one frame per frame, geometry from
  PerFrameFunctionalGroupsSequence falling back to SharedFunctionalGroupsSequence, then the top level;
* Siemens mosaic (ImageType contains ``MOSAIC``): one frame per tile (see `_mosaic_frames` for the
  position formula, the one of nibabel's ``MosaicWrapper`` and dcm2niix).

Pixels are decoded lazily by pydicom's pixel backends (pylibjpeg / -openjpeg / -libjpeg / -rle, pyjpegls,
gdcm; every common transfer syntax), then junk bits above BitsStored are masked, signed values
sign-extended, and RescaleSlope/Intercept (or a Modality LUT Sequence) applied → float32 (HU for CT).
PixelPaddingValue is left as stored (reported in ``extra``). A decoder failure becomes
``QuarantineError("undecodable_pixels")``; non-image objects (SR, RTSTRUCT, SEG, PR…)
``QuarantineError("non_image_object")``; images without patient geometry ``QuarantineError("no_geometry")``.

Temporal keys (4D series). Frames carry the highest-precedence key found in ``temporal_key`` and every
candidate, in precedence order, in ``extra["temporal_candidates"]`` (a dict; `medssl.data.dicom` decides
which one actually separates repeated positions). Precedence:
``temporal_position`` (TemporalPositionIdentifier / enhanced TemporalPositionIndex) >
``diffusion`` (b-value in s/mm², gradient direction) > ``trigger_time`` (ms) > ``stack_id`` (enhanced) >
``acquisition_number`` (candidate only, never put in ``temporal_key``: it is meaningful only when
positions repeat). Keys are tuples ``(name, value, ...)`` so keys of one kind sort together.

PHI: ``extra`` holds only technical, non-identifying attributes (`EXTRA_KEYWORDS`); error details name
the modality, SOP class or transfer syntax, never patient/study identifiers, dates or UIDs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.dicom_types import DicomFrame
from medssl.errors import QuarantineError

__all__ = ["EXTRA_KEYWORDS", "NON_IMAGE_MODALITIES", "frames_from_dataset", "is_mosaic", "fix_stored_bits"]

logger = logging.getLogger(__name__)

DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian

# Non-PHI attributes copied into DicomFrame.extra (keyword -> extra key).
EXTRA_KEYWORDS = {
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "model",
    "KVP": "kvp",
    "ConvolutionKernel": "convolution_kernel",
    "MagneticFieldStrength": "field_strength",
    "ImageType": "image_type",
    "BitsStored": "bits_stored",
    "PixelPaddingValue": "pixel_padding_value",
    "PhotometricInterpretation": "photometric",
}
NON_IMAGE_MODALITIES = frozenset({
    "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "PR", "KO", "REG", "FID", "RWV",
    "DOC", "PLAN", "AU", "ECG", "HD", "EPS", "RESP", "SMR", "M3D",
})
# SOP class names (pydicom UID dictionary) of objects that are not volumetric images.
_NON_IMAGE_SOP_WORDS = (
    "Structured Report", "SR Storage", "Segmentation", "Presentation State", "Key Object", "RT Structure",
    "RT Plan", "RT Dose", "RT Beams", "RT Ion", "Treatment Record", "Encapsulated", "Raw Data", "Registration",
    "Waveform", "Surface", "Fiducials", "Real World Value", "Spectroscopy", "Parametric Map",
)


def frames_from_dataset(ds: Any, path: str | Path) -> list[DicomFrame]:
    """Turn one DICOM dataset into its image planes.

    Args:
        ds: a ``pydicom.Dataset``; may be read with ``stop_before_pixels=True`` or ``defer_size``
            (pixels are then re-read from ``path`` lazily); if it holds pixel data in memory, that is used.
        path: the file ``ds`` was read from.

    Returns:
        One `DicomFrame` per plane (tiles of a mosaic, frames of a multi-frame object). ``load()``
        decodes lazily and returns ``(rows, cols)`` float32 after the modality LUT (HU for CT).

    Raises:
        QuarantineError: ``non_image_object`` (SR, RTSTRUCT, SEG…, or no pixel data), ``no_geometry``
            (no ImagePositionPatient/ImageOrientationPatient/PixelSpacing), ``color_image``,
            ``invalid_geometry`` (degenerate orientation, non-positive spacing), ``bad_mosaic``.
    """
    path = Path(path)
    _check_image_object(ds, path)
    source = _PixelSource(ds, path)
    if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _enhanced_frames(ds, path, source)
    if is_mosaic(ds):
        return _mosaic_frames(ds, path, source)
    return [_single_frame(ds, path, source)]


def is_mosaic(ds: Any) -> bool:
    """True for a Siemens mosaic (ImageType contains ``MOSAIC``)."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).upper() == "MOSAIC" for v in image_type)


def fix_stored_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Mask bits above BitsStored and sign-extend two's-complement values (PixelRepresentation 1).

    pydicom 3 already does this for native (uncompressed) data; decoders of compressed syntaxes
    (RLE keeps all 16 bits) may not, so it is applied to every decoded array (idempotent).
    E.g. BitsStored 12, stored word ``0xAFFF`` → ``0x0FFF`` → ``-1`` when signed, ``4095`` when not.

    Args:
        arr: integer array as decoded.
        bits_stored: BitsStored.
        signed: PixelRepresentation == 1.
    """
    if arr.dtype.kind not in "iu":
        return arr
    if not arr.dtype.isnative:  # big-endian syntaxes decode to '>i2': views below need native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    nbits = arr.dtype.itemsize * 8
    if not 0 < bits_stored < nbits:
        return arr
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    u = arr.view(unsigned) & unsigned.type((1 << bits_stored) - 1)
    if not signed:
        return u
    s = u.view(np.dtype(f"i{arr.dtype.itemsize}"))
    sign = s.dtype.type(1 << (bits_stored - 1))
    return (s ^ sign) - sign  # two's-complement sign extension of a bits_stored-bit value


# ---------------------------------------------------------------------------------------------------
# object checks and shared helpers


def _check_image_object(ds: Any, path: Path) -> None:
    modality = str(ds.get("Modality", "") or "").upper()
    sop = ds.get("SOPClassUID")
    sop_name = str(getattr(sop, "name", "") or "") if sop is not None else ""
    what = " / ".join(x for x in (modality, sop_name) if x) or "unknown object"
    if modality in NON_IMAGE_MODALITIES or any(w.lower() in sop_name.lower() for w in _NON_IMAGE_SOP_WORDS):
        raise QuarantineError("non_image_object", what, path)
    if "Rows" not in ds or "Columns" not in ds:
        raise QuarantineError("non_image_object", f"{what}: no Rows/Columns", path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise QuarantineError("color_image", f"{what}: {ds.get('PhotometricInterpretation', '?')} "
                              f"with {ds.SamplesPerPixel} samples per pixel", path)


def transfer_syntax_name(ds: Any) -> str:
    """Name of the dataset's transfer syntax (``"JPEG 2000 Image Compression (Lossless Only)"``…)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        return "Implicit VR Little Endian (no file meta)"
    return str(getattr(uid, "name", "") or uid)


def _floats(value: Any, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise QuarantineError("invalid_geometry", f"{what} is not numeric", path) from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise QuarantineError("invalid_geometry", f"{what} needs {n} finite values, got {arr.size}", path)
    return arr


def make_geometry(ipp: Any, iop: Any, spacing: Any, path: Path,
                  what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Validate IPP/IOP/PixelSpacing → ``(position (3,), orientation (6,), (row mm, col mm))``."""
    if ipp is None or iop is None or spacing is None:
        missing = [n for n, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", spacing)) if v is None]
        raise QuarantineError("no_geometry", f"{what}: no {'/'.join(missing)}", path)
    pos = _floats(ipp, 3, "ImagePositionPatient", path)
    ori = _floats(iop, 6, "ImageOrientationPatient", path)
    sp = _floats(spacing, 2, "PixelSpacing", path)
    if np.linalg.norm(np.cross(ori[:3], ori[3:])) < 1e-3:
        raise QuarantineError("invalid_geometry", f"degenerate ImageOrientationPatient {ori.round(4).tolist()}",
                              path)
    if np.any(sp <= 0):
        raise QuarantineError("invalid_geometry", f"non-positive PixelSpacing {sp.tolist()}", path)
    return pos, ori, (float(sp[0]), float(sp[1]))


def _plain(value: Any) -> object:
    """pydicom value → str / int / float (multi-values joined with ``\\``)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    for t in (bool, int, float):  # pydicom IS/DS subclass int/float
        if isinstance(value, t):
            return t(value)
    return str(value)


def base_extra(ds: Any) -> dict[str, object]:
    """Non-PHI technical attributes of ``ds`` (`EXTRA_KEYWORDS`) plus the transfer syntax name."""
    extra: dict[str, object] = {"transfer_syntax": transfer_syntax_name(ds)}
    for kw, key in EXTRA_KEYWORDS.items():
        v = ds.get(kw)
        if v is not None and v != "":
            extra[key] = _plain(v)
    return extra


def temporal_candidates(ds: Any) -> dict[str, tuple]:
    """Candidate temporal keys of a classic (single-frame or mosaic) dataset, in precedence order."""
    cand: dict[str, tuple] = {}
    tpi = ds.get("TemporalPositionIdentifier")
    if tpi is not None and tpi != "":
        cand["temporal_position"] = ("temporal_position", int(tpi))
    b = ds.get("DiffusionBValue")
    if b is not None and b != "":
        g = ds.get("DiffusionGradientOrientation") or (0.0, 0.0, 0.0)
        cand["diffusion"] = diffusion_key(float(b), g)
    tt = ds.get("TriggerTime")
    if tt is not None and tt != "":
        cand["trigger_time"] = ("trigger_time", round(float(tt), 3))
    an = ds.get("AcquisitionNumber")
    if an is not None and an != "":
        cand["acquisition_number"] = ("acquisition_number", int(an))
    return cand


def diffusion_key(b: float, gradient: Any) -> tuple:
    """``("diffusion", b s/mm², gx, gy, gz)`` rounded so float noise does not split volumes."""
    g = [round(float(x), 4) + 0.0 for x in (list(gradient) + [0.0, 0.0, 0.0])[:3]]
    return ("diffusion", round(b, 2), *g)


def pick_temporal_key(cand: dict[str, tuple]) -> tuple | None:
    """Highest-precedence candidate, never ``acquisition_number`` (see module docstring)."""
    for name in ("temporal_position", "diffusion", "trigger_time", "stack_id"):
        if name in cand:
            return cand[name]
    return None


# ---------------------------------------------------------------------------------------------------
# pixel decoding


class _PixelSource:
    """Lazy pixel access for one file: stored values (masked, sign-extended), all frames ``(F, R, C)``.

    A dataset that holds its pixel data in memory is decoded from memory; otherwise the file is re-read
    when pixels are first needed. With ``cache=True`` (multi-frame, mosaic) the file is decoded once and
    kept until the frames are dropped; single frames are decoded on every call (the caller stacks them).
    """

    def __init__(self, ds: Any, path: Path) -> None:
        self.path = path
        self.ts_name = transfer_syntax_name(ds)
        meta = getattr(ds, "file_meta", None)
        self.ts_uid = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
        self.bits_stored = int(ds.get("BitsStored", 0) or 0)
        self.signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        self.n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self.what = " / ".join(x for x in (str(ds.get("Modality", "") or ""),
                                           str(getattr(ds.get("SOPClassUID"), "name", "") or "")) if x)
        self._ds = ds if _pixels_in_memory(ds) else None
        self._cache: np.ndarray | None = None
        self._lock = threading.Lock()

    def frames(self, cache: bool = False) -> np.ndarray:
        """All frames, ``(F, rows, cols)`` in their stored integer (or float) type."""
        if self._cache is not None:
            return self._cache
        with self._lock:
            if self._cache is not None:
                return self._cache
            arr = self._decode()
            arr = arr.reshape((self.n_frames, *arr.shape[-2:])) if arr.ndim == 2 else arr
            if self.bits_stored:
                arr = fix_stored_bits(arr, self.bits_stored, self.signed)
            if cache:
                self._cache = arr
            return arr

    def _decode(self) -> np.ndarray:
        try:
            if self._ds is not None:
                return self._ds.pixel_array
            return _decode_file(self.path, self.ts_uid)
        except QuarantineError:
            raise
        except Exception as e:  # decoder plugins raise many types (RuntimeError, ValueError, …)
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            raise QuarantineError("undecodable_pixels", f"{self.ts_name}: {type(e).__name__}: {msg}",
                                  self.path) from None


def _pixels_in_memory(ds: Any) -> bool:
    """True when ``ds`` holds a pixel data value (not absent, not deferred to the file)."""
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            # keep_deferred: do not pull a deferred (defer_size) value into memory just to look at it
            return getattr(ds.get_item(kw, keep_deferred=True), "value", None) is not None
    return False


def _decode_file(path: Path, ts_uid: str) -> np.ndarray:
    """Decode ``path``'s pixel data with pydicom's backends."""
    import pydicom
    from pydicom.pixels import pixel_array

    if ts_uid != DEFLATED:  # the fast reader does not inflate deflated datasets
        # Reads only what is needed and never builds Dataset objects for the pixel bytes.
        return pixel_array(str(path))
    ds = pydicom.dcmread(path, force=True)
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise QuarantineError("non_image_object", "no pixel data", path)
    return ds.pixel_array


def make_rescale(slope: Any = None, intercept: Any = None, lut_ds: Any = None,
                 path: Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Stored values → modality values, float32: ``slope * x + intercept`` or a Modality LUT Sequence."""
    if slope is None and intercept is None and lut_ds is not None and "ModalityLUTSequence" in lut_ds:
        from pydicom.pixels import apply_modality_lut

        return lambda x: np.asarray(apply_modality_lut(x, lut_ds), dtype=np.float32)
    s = 1.0 if slope in (None, "") else float(slope)
    b = 0.0 if intercept in (None, "") else float(intercept)
    if not (math.isfinite(s) and math.isfinite(b)) or s == 0:
        raise QuarantineError("invalid_rescale", f"RescaleSlope {s}, RescaleIntercept {b}", path)
    if s == 1.0:
        return lambda x: x.astype(np.float32) + np.float32(b) if b else x.astype(np.float32)
    # float64 arithmetic so e.g. slope 0.5 / intercept -1024 is exact before the float32 cast
    return lambda x: (x.astype(np.float64) * s + b).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# classic single-frame


def _single_frame(ds: Any, path: Path, source: _PixelSource) -> DicomFrame:
    what = source.what or "image"
    pos, ori, sp = make_geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                                 ds.get("PixelSpacing"), path, what)
    rescale = make_rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), lut_ds=ds, path=path)
    cand = temporal_candidates(ds)
    cand.update(siemens_diffusion(ds, cand))
    extra = base_extra(ds)
    if cand:
        extra["temporal_candidates"] = cand
    rows, cols = int(ds.Rows), int(ds.Columns)

    def load() -> np.ndarray:
        arr = source.frames()[0]
        if arr.shape != (rows, cols):
            raise QuarantineError("undecodable_pixels", f"{source.ts_name}: decoded shape {arr.shape} "
                                  f"!= ({rows}, {cols})", path)
        return rescale(arr)

    thick = ds.get("SliceThickness")
    return DicomFrame(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or ""), position=pos,
                      orientation=ori, pixel_spacing=sp, rows=rows, cols=cols, load=load,
                      instance_number=_int(ds.get("InstanceNumber")), frame_index=0,
                      temporal_key=pick_temporal_key(cand), modality=str(ds.get("Modality", "") or ""),
                      slice_thickness=float(thick) if thick not in (None, "") else None, extra=extra)


def siemens_diffusion(ds: Any, cand: dict[str, tuple]) -> dict[str, tuple]:
    """Siemens private b-value (0019,xx0C) / gradient (0019,xx0E) when no standard attribute exists."""
    if "diffusion" in cand or "SIEMENS" not in str(ds.get("Manufacturer", "")).upper():
        return {}
    try:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        b = block[0x0C].value
        g = block[0x0E].value if 0x0E in block else (0.0, 0.0, 0.0)
    except (KeyError, ValueError, AttributeError):
        return {}
    try:
        b = float(b if not isinstance(b, bytes) else b.decode(errors="ignore").strip("\x00 "))
        g = g if not isinstance(g, bytes) else np.frombuffer(g, "<f8")
        return {"diffusion": diffusion_key(b, list(g))}
    except (TypeError, ValueError):
        return {}


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------------
# enhanced multi-frame


def _group_item(groups: Any, seq: str) -> Any:
    """First item of functional group ``seq`` inside one functional-groups item, or ``None``."""
    if groups is None or seq not in groups:
        return None
    s = groups[seq].value
    return s[0] if len(s) else None


def _fg(per: Any, shared: Any, seq: str, kw: str, top: Any = None) -> Any:
    """Attribute ``kw`` of group ``seq``: per-frame item, else shared item, else top-level dataset."""
    for groups in (per, shared):
        item = _group_item(groups, seq)
        if item is not None and kw in item and item[kw].value not in (None, ""):
            return item[kw].value
    if top is not None:
        v = top.get(kw)
        return v if v not in (None, "") else None
    return None


def _enhanced_frames(ds: Any, path: Path, source: _PixelSource) -> list[DicomFrame]:
    n = source.n_frames
    per_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    if per_seq and len(per_seq) != n:
        raise QuarantineError("invalid_geometry", f"{len(per_seq)} per-frame groups for {n} frames", path)
    if not per_seq and shared is None:
        raise QuarantineError("no_geometry", f"{source.what or 'multi-frame'}: {n} frames without "
                              "functional groups (no per-frame positions)", path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    base = base_extra(ds)
    common = dict(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or ""), rows=rows, cols=cols,
                  instance_number=_int(ds.get("InstanceNumber")), modality=str(ds.get("Modality", "") or ""))
    frames = []
    for i in range(n):
        per = per_seq[i] if per_seq else None
        pos, ori, sp = make_geometry(
            _fg(per, shared, "PlanePositionSequence", "ImagePositionPatient", ds),
            _fg(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient", ds),
            _fg(per, shared, "PixelMeasuresSequence", "PixelSpacing", ds), path, source.what or "multi-frame")
        slope = _fg(per, shared, "PixelValueTransformationSequence", "RescaleSlope", ds)
        intercept = _fg(per, shared, "PixelValueTransformationSequence", "RescaleIntercept", ds)
        thick = _fg(per, shared, "PixelMeasuresSequence", "SliceThickness", ds)
        cand = _enhanced_temporal(per, shared)
        extra = dict(base)
        if cand:
            extra["temporal_candidates"] = cand
        frames.append(DicomFrame(
            position=pos, orientation=ori, pixel_spacing=sp, frame_index=i,
            load=_frame_loader(source, i, make_rescale(slope, intercept, lut_ds=ds, path=path)),
            temporal_key=pick_temporal_key(cand), extra=extra,
            slice_thickness=float(thick) if thick is not None else None, **common))
    return frames


def _enhanced_temporal(per: Any, shared: Any) -> dict[str, tuple]:
    cand: dict[str, tuple] = {}
    tpi = _fg(per, None, "FrameContentSequence", "TemporalPositionIndex")
    if tpi is not None:
        cand["temporal_position"] = ("temporal_position", int(tpi))
    b = _fg(per, shared, "MRDiffusionSequence", "DiffusionBValue")
    if b is not None:
        diff = _group_item(per, "MRDiffusionSequence") or _group_item(shared, "MRDiffusionSequence")
        grad = (0.0, 0.0, 0.0)
        if diff is not None and "DiffusionGradientDirectionSequence" in diff and diff.DiffusionGradientDirectionSequence:
            grad = diff.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation") or grad
        cand["diffusion"] = diffusion_key(float(b), grad)
    tt = _fg(per, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
    if tt is not None:
        cand["trigger_time"] = ("trigger_time", round(float(tt), 3))
    sid = _fg(per, None, "FrameContentSequence", "StackID")
    if sid is not None:
        cand["stack_id"] = ("stack_id", str(sid))
    div = _fg(per, None, "FrameContentSequence", "DimensionIndexValues")
    if div is not None:
        cand["dimension_index"] = ("dimension_index", *[int(v) for v in (div if isinstance(div, (list, tuple))
                                                                          or type(div).__name__ == "MultiValue"
                                                                          else [div])])
    return cand


def _frame_loader(source: _PixelSource, index: int,
                  rescale: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return rescale(source.frames(cache=True)[index])

    return load


# ---------------------------------------------------------------------------------------------------
# Siemens mosaic


def _mosaic_count(ds: Any, csa: dict | None) -> int | None:
    """NumberOfImagesInMosaic: CSA image header, else Siemens private (0019,xx0A)."""
    if csa is not None:
        csareader = _csareader()
        n = csareader.get_scalar(csa, "NumberOfImagesInMosaic")
        if n:
            return int(n)
    try:
        v = ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value
    except (KeyError, ValueError):
        v = ds.get((0x0019, 0x100A))
        v = v.value if v is not None else None
    if isinstance(v, bytes):
        v = int.from_bytes(v[:2], "little") if len(v) >= 2 else None
    return int(v) if v else None


def _csareader() -> Any:
    """nibabel's CSA reader (importing nibabel.nicom warns that its DICOM *readers* are experimental;
    only the CSA parser is used here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


def _csa_image_header(ds: Any) -> dict | None:
    try:
        return _csareader().get_csa_header(ds, "image")
    except Exception:  # nibabel raises CSAReadError / struct.error on damaged headers
        logger.warning("unreadable Siemens CSA image header; using the standard attributes only")
        return None


def _mosaic_frames(ds: Any, path: Path, source: _PixelSource) -> list[DicomFrame]:
    """Tiles of a Siemens mosaic, with the geometry of nibabel's ``MosaicWrapper`` / dcm2niix.

    A mosaic of ``N`` slices is an ``m x m`` grid of tiles, ``m = ceil(sqrt(N))``, each
    ``(Rows/m, Columns/m)``; tile ``k`` sits at grid row ``k // m``, grid column ``k % m``. The mosaic's
    ImagePositionPatient is the corner of the whole *mosaic* as if it were one image, so the first
    tile's corner is (nibabel ``MosaicWrapper.image_position``, dcm2niix ``nii_dicom.c``
    ``nii_mosaic_geometry``)::

        P0 = IPP + col_cos * row_spacing * (Rows - tile_rows) / 2
                 + row_cos * col_spacing * (Columns - tile_cols) / 2

    and tile ``k`` is at ``P0 + k * dz * n`` with ``n`` the CSA SliceNormalVector (else
    ``row_cos x col_cos``) and ``dz`` SpacingBetweenSlices (else SliceThickness).
    """
    csa = _csa_image_header(ds)
    n = _mosaic_count(ds, csa)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not n or n < 1:
        raise QuarantineError("bad_mosaic", "MOSAIC image without NumberOfImagesInMosaic", path)
    m = math.ceil(math.sqrt(n))
    if rows % m or cols % m:
        raise QuarantineError("bad_mosaic", f"{rows}x{cols} mosaic not divisible into {m}x{m} tiles", path)
    tr, tc = rows // m, cols // m
    ipp, ori, sp = make_geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                                 ds.get("PixelSpacing"), path, source.what or "mosaic")
    row_cos, col_cos = ori[:3], ori[3:]
    p0 = ipp + col_cos * sp[0] * (rows - tr) / 2 + row_cos * sp[1] * (cols - tc) / 2
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    if csa is not None:
        csareader = _csareader()
        try:
            snv = csareader.get_vector(csa, "SliceNormalVector", 3)
        except ValueError:
            snv = None
        if snv is not None and np.linalg.norm(snv) > 0.5:
            normal = np.asarray(snv, dtype=np.float64) / np.linalg.norm(snv)
    dz = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if dz in (None, "") or float(dz) <= 0:
        raise QuarantineError("bad_mosaic", "no SpacingBetweenSlices / SliceThickness for the tile step", path)
    dz = float(dz)
    rescale = make_rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), lut_ds=ds, path=path)
    cand = temporal_candidates(ds)
    if csa is not None and "diffusion" not in cand:
        csareader = _csareader()
        b = csareader.get_scalar(csa, "B_value")
        if b is not None:
            g = csareader.get_vector(csa, "DiffusionGradientDirection", 3) if b else None
            cand["diffusion"] = diffusion_key(float(b), g if g is not None else (0.0, 0.0, 0.0))
    extra = base_extra(ds)
    extra["mosaic_tiles"] = n
    if cand:
        extra["temporal_candidates"] = cand
    thick = ds.get("SliceThickness")
    frames = []
    for k in range(n):
        r0, c0 = (k // m) * tr, (k % m) * tc

        def load(r0: int = r0, c0: int = c0) -> np.ndarray:
            return rescale(source.frames(cache=True)[0, r0:r0 + tr, c0:c0 + tc])

        frames.append(DicomFrame(
            path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or ""), position=p0 + k * dz * normal,
            orientation=ori.copy(), pixel_spacing=sp, rows=tr, cols=tc, load=load,
            instance_number=_int(ds.get("InstanceNumber")), frame_index=k, temporal_key=pick_temporal_key(cand),
            modality=str(ds.get("Modality", "") or ""), extra=dict(extra),
            slice_thickness=float(thick) if thick not in (None, "") else None))
    return frames
