"""Every DICOM flavour → `DicomFrame`s: pixel decoding, value rescaling and per-plane geometry.

`frames_from_dataset` turns one parsed file into 2D planes with LPS geometry:

* classic single-frame image (CT/MR/PT Image Storage…): one frame;
* enhanced multi-frame object (Enhanced CT/MR…): one frame per frame, geometry from
  PerFrameFunctionalGroupsSequence, else SharedFunctionalGroupsSequence, else the top level;
* Siemens mosaic (ImageType contains ``MOSAIC``): one frame per tile (formula in `_mosaic_frames`).

Pixels are decoded lazily by pydicom's pixel backends (pylibjpeg + -openjpeg/-libjpeg/-rle, pyjpegls,
gdcm: every common transfer syntax); bits above BitsStored are masked, signed values sign-extended, and
RescaleSlope/Intercept (or a Modality LUT Sequence) applied → float32 (HU for CT). PixelPaddingValue is
kept as stored (reported in ``extra``). Failures: ``QuarantineError`` with reason ``undecodable_pixels``
(decoder error, named by transfer syntax), ``non_image_object`` (SR, RTSTRUCT, SEG, PR…, no pixels),
``no_geometry`` (no ImagePositionPatient/ImageOrientationPatient/PixelSpacing, e.g. secondary capture),
``color_image``, ``invalid_geometry``, ``invalid_rescale``, ``bad_mosaic``.

Temporal keys (4D series): each frame's ``extra["temporal_candidates"]`` holds every candidate, in
precedence order, and ``temporal_key`` the first of them that is not ``acquisition_number``:
``temporal_position`` (TemporalPositionIdentifier / enhanced TemporalPositionIndex) > ``diffusion``
(b-value s/mm² + gradient; standard attributes, enhanced MRDiffusionSequence, Siemens CSA / private
(0019,xx0C/0E)) > ``trigger_time`` (ms; enhanced NominalCardiacTriggerDelayTime) > ``stack_id`` (enhanced)
> ``acquisition_number`` (only meaningful when positions repeat).
`medssl.data.resample.split_temporal` decides which one separates repeated positions. Keys are tuples
``(name, value, ...)``, so keys of one kind sort together.

PHI: ``extra`` holds only technical attributes (`EXTRA_KEYWORDS`); error details name the modality,
SOP class or transfer syntax, never patient/study identifiers, dates or UIDs.

Header attributes (checks, geometry, ``extra``, temporal keys) are read by `medssl.data.dicom_header`;
this module builds the frames and decodes their pixels.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.dicom_header import (
    EXTRA_KEYWORDS,
    NON_IMAGE_MODALITIES,
    _check_image_object,
    _classic_temporal,
    _csareader,
    _enhanced_temporal,
    _extra,
    _fg,
    _frame,
    _geometry,
    _what,
    transfer_syntax_name,
)
from medssl.data.dicom_types import DicomFrame
from medssl.errors import QuarantineError

__all__ = ["EXTRA_KEYWORDS", "NON_IMAGE_MODALITIES", "fix_stored_bits", "frames_from_dataset", "is_mosaic",
           "transfer_syntax_name"]

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def frames_from_dataset(ds: Any, path: str | Path) -> list[DicomFrame]:
    """Turn one DICOM dataset into its image planes.

    Args:
        ds: a ``pydicom.Dataset``; may be read with ``stop_before_pixels=True`` or ``defer_size`` (pixels
            are then re-read from ``path`` when first loaded); pixel data held in memory is used as is.
        path: the file ``ds`` was read from.

    Returns:
        One `DicomFrame` per plane (a mosaic's tiles, a multi-frame object's frames). ``load()`` decodes
        lazily and returns ``(rows, cols)`` float32 after the modality LUT (HU for CT).

    Raises:
        QuarantineError: see the module docstring for the reasons.
    """
    path = Path(path)
    _check_image_object(ds, path)
    source = _PixelSource(ds, path)
    if "PerFrameFunctionalGroupsSequence" in ds or source.n_frames > 1:
        return _enhanced_frames(ds, path, source)
    if is_mosaic(ds):
        return _mosaic_frames(ds, path, source)
    pos, ori, sp = _geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                             ds.get("PixelSpacing"), path, source.what)
    rescale = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), ds, path)
    return [_frame(ds, path, pos, ori, sp, _loader(source, 0, rescale), _classic_temporal(ds, None),
                   thickness=ds.get("SliceThickness"))]


def is_mosaic(ds: Any) -> bool:
    """True for a Siemens mosaic (ImageType contains ``MOSAIC``)."""
    image_type = ds.get("ImageType") or []
    return any(str(v).upper() == "MOSAIC" for v in ([image_type] if isinstance(image_type, str) else image_type))


def fix_stored_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Mask bits above BitsStored and sign-extend two's-complement values (PixelRepresentation 1).

    E.g. BitsStored 12, stored word ``0xAFFF`` → ``0x0FFF`` → ``-1`` when signed, ``4095`` when not.
    pydicom 3.0.2 already does this on every path tested (native LE/BE/implicit/deflate, RLE, JPEG
    lossless, JPEG-LS, JPEG 2000); this idempotent guard (~0.05 ms per 512² plane) protects against
    decoder plugins that do not.

    Args:
        arr: integer array as decoded, any shape.
        bits_stored: BitsStored.
        signed: PixelRepresentation == 1.
    """
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < arr.dtype.itemsize * 8:
        return arr
    if not arr.dtype.isnative:  # big-endian data may decode to '>i2': the views below need native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    u = arr.view(unsigned) & unsigned.type((1 << bits_stored) - 1)
    if not signed:
        return u
    s = u.view(np.dtype(f"i{arr.dtype.itemsize}"))
    sign = s.dtype.type(1 << (bits_stored - 1))
    return (s ^ sign) - sign  # two's-complement sign extension of a bits_stored-bit value


# ---------------------------------------------------------------------------------------------------
# pixels


class _PixelSource:
    """Lazy pixel access for one file: stored values (masked, sign-extended), all frames ``(F, rows, cols)``.

    Pixel data held in memory by ``ds`` is decoded from there; otherwise the file is re-read when pixels
    are first needed (the dataset may be a deferred / header-only read). ``frames(cache=True)``
    (multi-frame, mosaic) decodes the file once and keeps it while the frames live; single frames are
    decoded on every call (the caller stacks them).
    """

    def __init__(self, ds: Any, path: Path) -> None:
        self.path, self.what = path, _what(ds)
        self.ts_name = transfer_syntax_name(ds)
        meta = getattr(ds, "file_meta", None)
        self.ts_uid = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
        self.bits_stored = int(ds.get("BitsStored", 0) or 0)
        self.signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        self.n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        in_memory = any(kw in ds and ds.get_item(kw, keep_deferred=True).value is not None  # no deferred read
                        for kw in _PIXEL_KEYWORDS)
        self._ds = ds if in_memory else None
        self._cache: np.ndarray | None = None
        self._lock = threading.Lock()

    def frames(self, cache: bool = False) -> np.ndarray:
        """All frames ``(F, rows, cols)``, stored integer (or float) values."""
        if self._cache is not None:
            return self._cache
        with self._lock:
            if self._cache is not None:
                return self._cache
            try:
                arr = self._ds.pixel_array if self._ds is not None else _decode_file(self.path, self.ts_uid)
            except QuarantineError:
                raise
            except Exception as e:  # decoder plugins raise many types (RuntimeError, ValueError, …)
                msg = str(e).splitlines()[0][:160] if str(e) else ""
                raise QuarantineError("undecodable_pixels", f"{self.ts_name}: {type(e).__name__}: {msg}",
                                      self.path) from None
            arr = arr.reshape((self.n_frames, *arr.shape[-2:])) if arr.ndim == 2 else arr
            arr = fix_stored_bits(arr, self.bits_stored, self.signed)
            if cache:
                self._cache = arr
            return arr


def _decode_file(path: Path, ts_uid: str) -> np.ndarray:
    """Decode ``path``'s pixel data with pydicom's backends."""
    import pydicom
    from pydicom.pixels import pixel_array

    if ts_uid != _DEFLATED:  # pydicom's fast reader does not inflate deflated datasets
        try:
            return pixel_array(str(path))  # reads only what it needs, no Dataset for the pixel bytes
        except AttributeError as e:
            raise QuarantineError("non_image_object", "no pixel data", path) from e
    ds = pydicom.dcmread(path, force=True)
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise QuarantineError("non_image_object", "no pixel data", path)
    return ds.pixel_array


def _rescale(slope: Any, intercept: Any, lut_ds: Any, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Stored values → modality values, float32: ``slope * x + intercept``, else a Modality LUT Sequence."""
    if slope in (None, "") and intercept in (None, "") and "ModalityLUTSequence" in lut_ds:
        from pydicom.pixels import apply_modality_lut

        return lambda x: np.asarray(apply_modality_lut(x, lut_ds), dtype=np.float32)
    s = 1.0 if slope in (None, "") else float(slope)
    b = 0.0 if intercept in (None, "") else float(intercept)
    if not (math.isfinite(s) and math.isfinite(b)) or s == 0:
        raise QuarantineError("invalid_rescale", f"RescaleSlope {s}, RescaleIntercept {b}", path)
    # float64 arithmetic so that e.g. slope 0.5 / intercept -1024 is exact before the float32 cast
    return lambda x: (x.astype(np.float64) * s + b).astype(np.float32)


def _loader(source: _PixelSource, index: int, rescale: Callable[[np.ndarray], np.ndarray],
            window: tuple[int, int, int, int] | None = None) -> Callable[[], np.ndarray]:
    """``load()`` of frame ``index`` (optionally the tile ``rows r0:r1, cols c0:c1``), rescaled."""
    cache = source.n_frames > 1 or window is not None

    def load() -> np.ndarray:
        plane = source.frames(cache=cache)[index]
        if window is not None:
            r0, r1, c0, c1 = window
            plane = plane[r0:r1, c0:c1]
        return rescale(plane)

    return load


# ---------------------------------------------------------------------------------------------------
# enhanced multi-frame


def _enhanced_frames(ds: Any, path: Path, source: _PixelSource) -> list[DicomFrame]:
    n = source.n_frames
    per_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None
    if per_seq and len(per_seq) != n:
        raise QuarantineError("invalid_geometry", f"{len(per_seq)} per-frame groups for {n} frames", path)
    if not per_seq and shared is None:
        raise QuarantineError("no_geometry", f"{source.what}: {n} frames without functional groups "
                              "(no per-frame positions)", path)
    base = _extra(ds)
    frames = []
    for i in range(n):
        per = per_seq[i] if per_seq else None
        pos, ori, sp = _geometry(_fg(per, shared, "PlanePositionSequence", "ImagePositionPatient", ds),
                                 _fg(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient", ds),
                                 _fg(per, shared, "PixelMeasuresSequence", "PixelSpacing", ds), path, source.what)
        rescale = _rescale(_fg(per, shared, "PixelValueTransformationSequence", "RescaleSlope", ds),
                           _fg(per, shared, "PixelValueTransformationSequence", "RescaleIntercept", ds), ds, path)
        frames.append(_frame(ds, path, pos, ori, sp, _loader(source, i, rescale), _enhanced_temporal(per, shared),
                             thickness=_fg(per, shared, "PixelMeasuresSequence", "SliceThickness", ds),
                             index=i, extra=base))
    return frames


# ---------------------------------------------------------------------------------------------------
# Siemens mosaic


def _mosaic_frames(ds: Any, path: Path, source: _PixelSource) -> list[DicomFrame]:
    """Tiles of a Siemens mosaic, with the geometry of nibabel's ``MosaicWrapper`` and dcm2niix.

    A mosaic of ``N`` slices (CSA NumberOfImagesInMosaic, else private (0019,xx0A)) is an ``m x m``
    grid, ``m = ceil(sqrt(N))``, of ``(Rows/m, Columns/m)`` tiles; tile ``k`` sits at grid row ``k // m``,
    column ``k % m``. The mosaic's ImagePositionPatient is the corner of the whole mosaic seen as one
    image, so the first tile's corner is (nibabel ``MosaicWrapper.image_position``; dcm2niix
    ``nii_dicom.c``)::

        P0 = IPP + col_cos * row_spacing * (Rows - tile_rows) / 2
                 + row_cos * col_spacing * (Columns - tile_cols) / 2

    and tile ``k`` is at ``P0 + k * dz * n``: ``n`` the CSA SliceNormalVector (else ``row_cos x
    col_cos``), ``dz`` SpacingBetweenSlices (else SliceThickness) in mm.
    """
    csar = _csareader()
    try:
        csa = csar.get_csa_header(ds, "image")
    except Exception:  # nibabel raises CSAReadError / struct.error on damaged headers
        logger.warning("unreadable Siemens CSA image header in %s; using standard attributes", path.name)
        csa = None
    n = csar.get_scalar(csa, "NumberOfImagesInMosaic") if csa is not None else None
    if not n:
        try:
            n = ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value
        except (KeyError, ValueError):
            n = None
        n = int.from_bytes(n[:2], "little") if isinstance(n, bytes) else n
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not n or int(n) < 1:
        raise QuarantineError("bad_mosaic", "MOSAIC image without NumberOfImagesInMosaic", path)
    n = int(n)
    m = math.ceil(math.sqrt(n))
    if rows % m or cols % m:
        raise QuarantineError("bad_mosaic", f"{rows}x{cols} mosaic not divisible into {m}x{m} tiles", path)
    tr, tc = rows // m, cols // m
    ipp, ori, sp = _geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                             ds.get("PixelSpacing"), path, source.what)
    row_cos, col_cos = ori[:3], ori[3:]
    p0 = ipp + col_cos * sp[0] * (rows - tr) / 2 + row_cos * sp[1] * (cols - tc) / 2
    normal = np.cross(row_cos, col_cos)
    try:
        snv = csar.get_vector(csa, "SliceNormalVector", 3) if csa is not None else None
    except ValueError:
        snv = None
    if snv is not None and np.linalg.norm(snv) > 0.5:
        normal = np.asarray(snv, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    dz = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if dz in (None, "") or float(dz) <= 0:
        raise QuarantineError("bad_mosaic", "no SpacingBetweenSlices / SliceThickness for the tile step", path)
    rescale = _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), ds, path)
    cand = _classic_temporal(ds, csa)
    extra = {**_extra(ds), "mosaic_tiles": n}
    return [_frame(ds, path, p0 + k * float(dz) * normal, ori.copy(), sp,
                   _loader(source, 0, rescale, ((k // m) * tr, (k // m + 1) * tr, (k % m) * tc, (k % m + 1) * tc)),
                   cand, thickness=ds.get("SliceThickness"), index=k, shape=(tr, tc), extra=extra)
            for k in range(n)]
