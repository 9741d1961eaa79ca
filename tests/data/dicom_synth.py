"""Generators of small synthetic DICOM objects for tests (every transfer syntax, enhanced, mosaic, non-image).

Every object carries the PHI sentinels of `PHI` so tests can assert they never leak.
Encoders: pydicom writes native syntaxes (implicit/explicit LE, explicit big endian, deflate) and
compresses RLE Lossless, JPEG-LS (pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg); python-gdcm transcodes
to the JPEG process 1 / 2-4 / 14 / 14 SV1 syntaxes that pydicom cannot encode.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

__all__ = ["PHI", "SYNTAXES", "LOSSY", "ramp", "make_slice", "write", "make_enhanced", "make_mosaic",
           "make_non_image", "csa2_bytes"]

PHI = {
    "PatientName": "SENTINEL^PHINAME",
    "PatientID": "PHIID7731",
    "PatientBirthDate": "19010203",
    "StudyDate": "20010917",
    "InstitutionName": "SENTINEL HOSPITAL",
    "AccessionNumber": "ACC99871",
    "ReferringPhysicianName": "DOC^SENTINEL",
}

# name -> (transfer syntax UID, encoder: "native" | "pydicom" | "gdcm:<gdcm TransferSyntax attribute>")
SYNTAXES = {
    "implicit_le": (ImplicitVRLittleEndian, "native"),
    "explicit_le": (ExplicitVRLittleEndian, "native"),
    "explicit_be": (ExplicitVRBigEndian, "native"),
    "deflated": (DeflatedExplicitVRLittleEndian, "native"),
    "rle": (RLELossless, "pydicom"),
    "jpegls_lossless": (JPEGLSLossless, "pydicom"),
    "jpegls_near": (JPEGLSNearLossless, "pydicom"),
    "j2k_lossless": (JPEG2000Lossless, "pydicom"),
    "j2k_lossy": (JPEG2000, "pydicom"),
    "jpeg_baseline": (UID("1.2.840.10008.1.2.4.50"), "gdcm:JPEGBaselineProcess1"),
    "jpeg_extended": (UID("1.2.840.10008.1.2.4.51"), "gdcm:JPEGExtendedProcess2_4"),
    "jpeg_lossless_p14": (UID("1.2.840.10008.1.2.4.57"), "gdcm:JPEGLosslessProcess14"),
    "jpeg_lossless_sv1": (UID("1.2.840.10008.1.2.4.70"), "gdcm:JPEGLosslessProcess14_1"),
}
LOSSY = {"jpegls_near", "j2k_lossy", "jpeg_baseline", "jpeg_extended"}


def ramp(rows: int = 24, cols: int = 20, lo: int = -1000, hi: int = 1500, seed: int = 0) -> np.ndarray:
    """Smooth int16 test image ``(rows, cols)`` from ``lo`` to ``hi`` plus small deterministic noise."""
    yy, xx = np.mgrid[:rows, :cols]
    base = lo + (hi - lo) * (0.6 * yy / max(rows - 1, 1) + 0.4 * xx / max(cols - 1, 1))
    noise = np.random.default_rng(seed).integers(-3, 4, size=(rows, cols))
    return np.clip(np.round(base) + noise, lo, hi).astype(np.int16)


def _base(sop_class: UID, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Manufacturer = "SYNTH"
    ds.SeriesNumber = 3
    for k, v in PHI.items():
        setattr(ds, k, v)
    return ds


def _pixels(ds: Dataset, image: np.ndarray, bits_stored: int | None) -> None:
    image = np.asarray(image)
    ds.Rows, ds.Columns = image.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = image.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(image.dtype.kind == "i")
    ds.PixelData = np.ascontiguousarray(image).astype(image.dtype.newbyteorder("<")).tobytes()


def make_slice(image: np.ndarray, *, position: tuple = (0.0, 0.0, 0.0),
               orientation: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), spacing: tuple = (0.8, 0.7),
               slope: float | None = None, intercept: float | None = None, bits_stored: int | None = None,
               modality: str = "CT", series_uid: str | None = None, instance: int = 1, **attrs: object) -> Dataset:
    """A classic single-frame CT/MR slice (Explicit VR LE) holding ``image`` ``(rows, cols)`` as stored values."""
    ds = _base(CTImageStorage if modality == "CT" else MRImageStorage, modality)
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 2.5
    if slope is not None or intercept is not None:
        ds.RescaleSlope = slope if slope is not None else 1
        ds.RescaleIntercept = intercept if intercept is not None else 0
    _pixels(ds, image, bits_stored)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write(ds: Dataset, path: Path, syntax: str = "explicit_le") -> Path:
    """Write ``ds`` to ``path`` in transfer syntax ``syntax`` (a key of `SYNTAXES`)."""
    import pydicom

    uid, how = SYNTAXES[syntax]
    path = Path(path)
    ds = ds.copy()
    if how == "native":
        if syntax == "explicit_be":
            arr = np.frombuffer(ds.PixelData, dtype=f"<u{ds.BitsAllocated // 8}")
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        pydicom.dcmwrite(path, ds, enforce_file_format=True, little_endian=syntax != "explicit_be",
                         implicit_vr=syntax == "implicit_le")
        return path
    if how == "pydicom":
        kwargs: dict[str, object] = {}
        if syntax == "jpegls_near":
            kwargs["jls_error"] = 3
        elif syntax == "j2k_lossy":
            kwargs["j2k_cr"] = [20]
        ds.compress(uid, encoding_plugin="pyjpegls" if "jpegls" in syntax else "", **kwargs)
        ds.save_as(path, enforce_file_format=True)
        return path
    import gdcm

    tmp = path.with_suffix(".tmp.dcm")
    ds.save_as(tmp, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(tmp))
    if not reader.Read():
        raise RuntimeError("gdcm could not read the explicit-LE fixture")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, how.split(":")[1])))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm could not transcode to {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm could not write {syntax}")
    tmp.unlink()
    return path


def _item(**kw: object) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def make_enhanced(images: np.ndarray, positions: np.ndarray, *, orientation: tuple = (1, 0, 0, 0, 1, 0),
                  spacing: tuple = (0.8, 0.7), slopes: list[float] | None = None,
                  intercepts: list[float] | None = None, temporal: list[int] | None = None,
                  shared_geometry: bool = True) -> Dataset:
    """Enhanced CT object: ``images`` ``(F, rows, cols)`` int16, ``positions`` ``(F, 3)`` mm (any order).

    Orientation and pixel measures go to the shared functional groups (or per frame when
    ``shared_geometry`` is False); positions, rescale and FrameContent go per frame.
    """
    ds = _base(EnhancedCTImageStorage, "CT")
    ds.NumberOfFrames = len(images)
    ds.InstanceNumber = 1
    geo = dict(PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=list(orientation))]),
               PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(spacing), SliceThickness=1.5)]))
    ds.SharedFunctionalGroupsSequence = Sequence([_item(**geo) if shared_geometry else Dataset()])
    per = []
    for i, pos in enumerate(positions):
        item = _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=[float(v) for v in pos])]),
                     FrameContentSequence=Sequence([_item(StackID="1", InStackPositionNumber=i + 1)]))
        if temporal is not None:
            item.FrameContentSequence[0].TemporalPositionIndex = temporal[i]
        if slopes is not None:
            item.PixelValueTransformationSequence = Sequence([_item(
                RescaleSlope=slopes[i], RescaleIntercept=intercepts[i] if intercepts else 0, RescaleType="HU")])
        if not shared_geometry:
            for k, v in geo.items():
                setattr(item, k, v)
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    _pixels(ds, np.asarray(images, dtype=np.int16), None)
    return ds


def csa2_bytes(tags: dict[str, tuple[str, list]]) -> bytes:
    """Siemens CSA2 (``SV10``) header with ``{name: (vr, values)}`` as read by nibabel.nicom.csareader."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77))
        for v in values:
            data = (repr(v) if isinstance(v, float) else str(v)).encode() + b"\x00"
            out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
            out.append(data + b"\x00" * (-len(data) % 4))
    return b"".join(out)


def make_mosaic(tiles: np.ndarray, *, position: tuple, orientation: tuple, spacing: tuple = (2.0, 2.0),
                slice_spacing: float = 3.0, slice_normal: tuple | None = None, csa: bool = True,
                private_count: bool = True) -> Dataset:
    """Siemens MR mosaic of ``tiles`` ``(N, tr, tc)`` uint16; ``position`` is the mosaic's (scanner) IPP.

    Writes NumberOfImagesInMosaic in the CSA image header (0029,1010) with SliceNormalVector when
    ``csa`` and in (0019,100A) when ``private_count``.
    """
    n, tr, tc = tiles.shape
    m = int(np.ceil(np.sqrt(n)))
    mosaic = np.zeros((m * tr, m * tc), dtype=np.uint16)
    for k in range(n):
        mosaic[(k // m) * tr:(k // m + 1) * tr, (k % m) * tc:(k % m + 1) * tc] = tiles[k]
    ds = _base(MRImageStorage, "MR")
    ds.Manufacturer = "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = slice_spacing
    ds.SpacingBetweenSlices = slice_spacing
    if private_count:
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", n)
    if csa:
        normal = slice_normal if slice_normal is not None else np.cross(orientation[:3], orientation[3:])
        hdr = csa2_bytes({"NumberOfImagesInMosaic": ("US", [n]),
                          "SliceNormalVector": ("FD", [float(v) for v in normal])})
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", hdr)
    _pixels(ds, mosaic, 12)
    return ds


def make_non_image(modality: str) -> Dataset:
    """A non-image object (``"SR"``, ``"RTSTRUCT"``, ``"SEG"``, ``"PR"``…) with the PHI sentinels."""
    import pydicom.uid as u

    sop = {"SR": u.BasicTextSRStorage, "RTSTRUCT": u.RTStructureSetStorage, "RTPLAN": u.RTPlanStorage,
           "SEG": u.SegmentationStorage, "PR": u.GrayscaleSoftcopyPresentationStateStorage,
           "KO": u.KeyObjectSelectionDocumentStorage}[modality]
    ds = _base(sop, modality)
    if modality == "SEG":  # a SEG has pixels and per-frame geometry: must still be rejected
        _pixels(ds, np.zeros((4, 4), np.uint8), None)
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    return ds
