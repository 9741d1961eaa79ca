"""Tests for medssl.data.dicom_frames: transfer syntaxes, stored bits, rescale, enhanced, mosaic, non-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl.data.dicom_frames import fix_stored_bits, frames_from_dataset
from medssl.errors import QuarantineError
from tests.data.dicom_synth import (
    LOSSY,
    PHI,
    SYNTAXES,
    make_enhanced,
    make_mosaic,
    make_non_image,
    make_slice,
    ramp,
    write,
)


def _read(path: Path, mode: str = "deferred") -> pydicom.Dataset:
    if mode == "deferred":  # what medssl.data.dicom does
        return pydicom.dcmread(path, defer_size="1 KB")
    if mode == "header":
        return pydicom.dcmread(path, stop_before_pixels=True)
    return pydicom.dcmread(path)


def _assert_no_phi(obj: object) -> None:
    text = repr(obj)
    for value in PHI.values():
        assert value not in text, f"PHI sentinel {value!r} leaked"


# ---------------------------------------------------------------------------------------------------
# transfer syntaxes


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_transfer_syntax_round_trip(syntax: str, tmp_path: Path) -> None:
    uid, _ = SYNTAXES[syntax]
    eight_bit = syntax in ("jpeg_baseline", "jpeg_extended")  # lossy JPEG processes 1/2: 8-bit samples
    image = ramp(40, 36, 0, 255).astype(np.uint8) if eight_bit else ramp(40, 36, -1000, 1500)
    ds = make_slice(image, position=(-10.0, 20.0, 30.5), slope=1, intercept=0)
    path = write(ds, tmp_path / f"{syntax}.dcm", syntax)
    on_disk = pydicom.dcmread(path, stop_before_pixels=True)
    assert on_disk.file_meta.TransferSyntaxUID == uid
    for mode in ("deferred", "header", "full"):
        (frame,) = frames_from_dataset(_read(path, mode), path)
        got = frame.load()
        assert got.dtype == np.float32 and got.shape == image.shape
        err = np.abs(got - image.astype(np.float32))
        span = float(image.max()) - float(image.min())
        if syntax == "jpegls_near":  # encoded with NEAR=3: every error within 3, and really lossy
            assert 0 < err.max() <= 3
        elif syntax == "j2k_lossy":  # 20:1 compression of a noisy ramp
            assert 0 < err.mean() < 0.02 * span and err.max() < 0.15 * span, (err.mean(), err.max())
        elif syntax in LOSSY:  # 8-bit JPEG process 1 / 2-4
            assert err.mean() < 0.01 * span and err.max() <= 8, (err.mean(), err.max())
        else:
            np.testing.assert_array_equal(got, image.astype(np.float32))
    assert frame.extra["transfer_syntax"] == uid.name
    np.testing.assert_allclose(frame.position, [-10.0, 20.0, 30.5])
    assert frame.pixel_spacing == (0.8, 0.7) and (frame.rows, frame.cols) == (40, 36)
    _assert_no_phi(frame.extra)


def test_undecodable_pixels_quarantined(tmp_path: Path) -> None:
    ds = make_slice(ramp(40, 36))
    path = write(ds, tmp_path / "j2k.dcm", "j2k_lossless")
    raw = bytearray(path.read_bytes())
    start = raw.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream SOC+SIZ
    raw[start:start + 60] = b"\x00" * 60  # destroy the codestream header
    path.write_bytes(bytes(raw))
    (frame,) = frames_from_dataset(_read(path), path)  # header is fine: decoding is lazy
    with pytest.raises(QuarantineError) as e:
        frame.load()
    assert e.value.reason == "undecodable_pixels"
    assert "JPEG 2000" in e.value.detail
    _assert_no_phi(str(e.value))


def test_jpeg_extended_12bit(tmp_path: Path) -> None:
    """12-bit JPEG Extended (process 4): no valid encoder here, so the invalid stream must quarantine.

    pydicom cannot encode it and gdcm 3.2 writes SOF1 precision 16 (from BitsAllocated) instead of 12,
    which libjpeg, gdcm and Pillow all refuse; the 8-bit process-2 case is covered above. Should a
    gdcm write precision 12, the stream must decode closely instead.
    """
    image = ramp(40, 36, 0, 4000).astype(np.uint16)
    path = write(make_slice(image, bits_stored=12), tmp_path / "ext12.dcm", "jpeg_extended")
    raw = pydicom.dcmread(path).PixelData
    sof = raw.find(b"\xff\xc1")
    assert sof > 0
    (frame,) = frames_from_dataset(_read(path), path)
    if raw[sof + 4] == 12:
        assert np.abs(frame.load() - image).mean() < 0.01 * 4000
        return
    with pytest.raises(QuarantineError) as e:
        frame.load()
    assert e.value.reason == "undecodable_pixels" and e.value.detail.startswith("JPEG Extended")


# ---------------------------------------------------------------------------------------------------
# stored bits, sign, rescale


JUNK_SYNTAXES = ["explicit_le", "implicit_le", "explicit_be", "deflated", "rle", "jpeg_lossless_sv1",
                 "jpegls_lossless", "j2k_lossless"]


@pytest.mark.parametrize("syntax", JUNK_SYNTAXES)
@pytest.mark.parametrize("signed", [True, False])
def test_junk_high_bits_masked(syntax: str, signed: bool, tmp_path: Path) -> None:
    """BitsStored 12 in 16-bit words with garbage in bits 12-15: masked, and sign-extended when signed.

    pydicom 3.0.2 already does this on every one of these paths (see the raw check below);
    `fix_stored_bits` guards decoder plugins that do not.
    """
    rng = np.random.default_rng(1)
    lo, hi = (-2048, 2047) if signed else (0, 4095)
    true = rng.integers(lo, hi + 1, size=(40, 36)).astype(np.int16 if signed else np.uint16)
    true[0, :4] = [lo, hi, -1 if signed else 1, 0]
    junk = rng.integers(1, 16, size=true.shape).astype(np.uint16) << 12  # bits 12-15 set to garbage
    stored = (true.view(np.uint16) & 0x0FFF) | junk
    ds = make_slice(stored.view(true.dtype), bits_stored=12)
    assert ds.BitsStored == 12 and ds.HighBit == 11 and ds.PixelRepresentation == int(signed)
    path = write(ds, tmp_path / "junk.dcm", syntax)
    (frame,) = frames_from_dataset(_read(path), path)
    np.testing.assert_array_equal(frame.load(), true.astype(np.float32))
    assert frame.extra["bits_stored"] == 12
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, true)  # pydicom's own behaviour


def test_fix_stored_bits_unit() -> None:
    words = np.array([0xAFFF, 0x0800, 0xF7FF, 0x0001], dtype=np.uint16)
    np.testing.assert_array_equal(fix_stored_bits(words.view(np.int16), 12, True), [-1, -2048, 2047, 1])
    np.testing.assert_array_equal(fix_stored_bits(words, 12, False), [4095, 2048, 2047, 1])
    full = np.array([-5, 7], dtype=np.int16)
    assert fix_stored_bits(full, 16, True) is full  # nothing to mask


def test_signed_rescale_float_slope(tmp_path: Path) -> None:
    stored = ramp(16, 12, -300, 3000)
    ds = make_slice(stored, slope=0.5, intercept=-1024)
    path = write(ds, tmp_path / "rescale.dcm")
    (frame,) = frames_from_dataset(_read(path), path)
    got = frame.load()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (stored.astype(np.float64) * 0.5 - 1024).astype(np.float32))
    assert got.min() < -1024  # negative stored values stay negative after the sign is applied


def test_modality_lut_sequence(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = (np.arange(16 * 8).reshape(16, 8) % 4).astype(np.uint16)
    ds = make_slice(stored)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.LUTData = np.array([10, 20, 40, 80], dtype="<u2").tobytes()
    ds.ModalityLUTSequence = Sequence([lut])
    path = write(ds, tmp_path / "lut.dcm")
    (frame,) = frames_from_dataset(_read(path), path)
    np.testing.assert_array_equal(frame.load(), np.array([10, 20, 40, 80], np.float32)[stored])


def test_padding_value_kept_and_reported(tmp_path: Path) -> None:
    stored = ramp(10, 10, -1000, 800)
    stored[:2] = -1500
    ds = make_slice(stored, slope=1, intercept=0, PixelPaddingValue=-1500)
    path = write(ds, tmp_path / "pad.dcm")
    (frame,) = frames_from_dataset(_read(path), path)
    assert frame.extra["pixel_padding_value"] == -1500
    assert (frame.load()[:2] == -1500).all()  # not clipped, not masked


# ---------------------------------------------------------------------------------------------------
# temporal keys, PHI


def test_temporal_candidates_and_precedence(tmp_path: Path) -> None:
    img = ramp(8, 8)
    ds = make_slice(img, modality="MR", TriggerTime=125.0, AcquisitionNumber=4)
    path = write(ds, tmp_path / "a.dcm")
    (f,) = frames_from_dataset(_read(path), path)
    assert f.temporal_key == ("trigger_time", 125.0)
    assert list(f.extra["temporal_candidates"]) == ["trigger_time", "acquisition_number"]
    ds.DiffusionBValue = 1000.0
    ds.DiffusionGradientOrientation = [0.0, 0.70710678, 0.70710678]
    ds.TemporalPositionIdentifier = 2
    path = write(ds, tmp_path / "b.dcm")
    (f,) = frames_from_dataset(_read(path), path)
    assert f.temporal_key == ("temporal_position", 2)
    assert f.extra["temporal_candidates"]["diffusion"] == ("diffusion", 1000.0, 0.0, 0.7071, 0.7071)
    del ds.TemporalPositionIdentifier
    path = write(ds, tmp_path / "c.dcm")
    (f,) = frames_from_dataset(_read(path), path)
    assert f.temporal_key[0] == "diffusion"
    (plain,) = frames_from_dataset(_read(write(make_slice(img), tmp_path / "d.dcm")), tmp_path / "d.dcm")
    assert plain.temporal_key is None


def test_phi_never_in_extra(tmp_path: Path) -> None:
    ds = make_slice(ramp(8, 8), KVP=120, ConvolutionKernel=["B30f", "3"], ImageType=["ORIGINAL", "PRIMARY"])
    path = write(ds, tmp_path / "phi.dcm")
    (f,) = frames_from_dataset(_read(path, "full"), path)
    assert f.extra["kvp"] == 120.0 and f.extra["convolution_kernel"] == "B30f\\3"
    _assert_no_phi(f.extra)
    text = repr(f.extra)
    for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
        assert uid not in text


# ---------------------------------------------------------------------------------------------------
# non-image / no geometry


@pytest.mark.parametrize("modality", ["SR", "RTSTRUCT", "RTPLAN", "SEG", "PR", "KO"])
def test_non_image_objects(modality: str, tmp_path: Path) -> None:
    path = write(make_non_image(modality), tmp_path / f"{modality}.dcm")
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(_read(path), path)
    assert e.value.reason == "non_image_object" and modality in e.value.detail
    _assert_no_phi(str(e.value))


def test_no_geometry(tmp_path: Path) -> None:
    ds = make_slice(ramp(8, 8), modality="CT")
    del ds.ImagePositionPatient
    ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    path = write(ds, tmp_path / "sc.dcm")
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(_read(path), path)
    assert e.value.reason == "no_geometry" and "ImagePositionPatient" in e.value.detail
    _assert_no_phi(str(e.value))


# ---------------------------------------------------------------------------------------------------
# enhanced multi-frame


def _enhanced_case(n: int = 5) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    images = np.stack([ramp(32, 32, -500 + 50 * i, 900 + 30 * i, seed=i) for i in range(n)])
    z = 40.0 - 2.5 * np.arange(n)  # frames stored in *descending* z (reverse slice order)
    positions = np.stack([np.full(n, -100.0), np.full(n, -90.0), z], axis=1)
    slopes = [1.0, 0.5, 2.0, 1.0, 0.25][:n]
    intercepts = [-1024.0, 0.0, -10.0, 5.5, -1000.0][:n]
    return images, positions, slopes, intercepts


@pytest.mark.parametrize("shared_geometry", [True, False])
@pytest.mark.parametrize("syntax", ["explicit_le", "j2k_lossless"])
def test_enhanced_per_frame_geometry(shared_geometry: bool, syntax: str, tmp_path: Path) -> None:
    images, positions, slopes, intercepts = _enhanced_case()
    ori = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    ds = make_enhanced(images, positions, orientation=ori, spacing=(0.6, 0.9), slopes=slopes,
                       intercepts=intercepts, temporal=[1, 1, 1, 1, 1], shared_geometry=shared_geometry)
    path = write(ds, tmp_path / "enh.dcm", syntax)
    frames = frames_from_dataset(_read(path), path)
    assert len(frames) == len(images)
    for i, f in enumerate(frames):
        assert f.frame_index == i and f.path == path
        np.testing.assert_allclose(f.position, positions[i])
        np.testing.assert_allclose(f.orientation, ori)
        assert f.pixel_spacing == (0.6, 0.9) and f.slice_thickness == 1.5
        assert f.temporal_key == ("temporal_position", 1)
        expect = (images[i].astype(np.float64) * slopes[i] + intercepts[i]).astype(np.float32)
        np.testing.assert_array_equal(f.load(), expect)
    np.testing.assert_allclose(frames[0].normal, [-1.0, 0.0, 0.0], atol=1e-12)
    _assert_no_phi([f.extra for f in frames])


def test_enhanced_decodes_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medssl.data.dicom_frames as mod

    images, positions, _, _ = _enhanced_case(4)
    path = write(make_enhanced(images, positions), tmp_path / "enh.dcm", "rle")
    calls = []
    real = mod._decode_file
    monkeypatch.setattr(mod, "_decode_file", lambda *a: calls.append(a) or real(*a))
    frames = frames_from_dataset(_read(path, "header"), path)
    assert calls == []  # lazy: nothing decoded at scan time
    got = np.stack([f.load() for f in reversed(frames)])[::-1]
    np.testing.assert_array_equal(got, images.astype(np.float32))
    assert len(calls) == 1


def test_enhanced_mismatched_groups_quarantined(tmp_path: Path) -> None:
    images, positions, _, _ = _enhanced_case(3)
    ds = make_enhanced(images, positions)
    ds.NumberOfFrames = 4
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "x.dcm")
    assert e.value.reason == "invalid_geometry"


# ---------------------------------------------------------------------------------------------------
# Siemens mosaic


def _rot_x(deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(a), -np.sin(a)])


@pytest.mark.parametrize("count_from", ["csa", "private"])
@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_mosaic_tiles_geometry_and_nibabel(count_from: str, tmp_path: Path) -> None:
    from nibabel.nicom.dicomwrappers import MosaicWrapper

    n, tr, tc = 7, 8, 10  # 3x3 grid, two empty tiles
    tiles = np.stack([ramp(tr, tc, 100 * k, 100 * k + 900, seed=k).astype(np.uint16) for k in range(n)])
    row_cos, col_cos = _rot_x(15.0)
    spacing, dz = (2.0, 1.5), 3.3
    normal = np.cross(row_cos, col_cos)
    true_p0 = np.array([-40.0, -55.0, 12.0])  # known corner of tile 0
    rows, cols = 3 * tr, 3 * tc
    ipp = true_p0 - col_cos * spacing[0] * (rows - tr) / 2 - row_cos * spacing[1] * (cols - tc) / 2
    ds = make_mosaic(tiles, position=tuple(ipp), orientation=(*row_cos, *col_cos), spacing=spacing,
                     slice_spacing=dz, csa=count_from == "csa", private_count=count_from == "private")
    path = write(ds, tmp_path / "mosaic.dcm")
    frames = frames_from_dataset(_read(path), path)
    assert len(frames) == n and all((f.rows, f.cols) == (tr, tc) for f in frames)
    for k, f in enumerate(frames):
        np.testing.assert_allclose(f.position, true_p0 + k * dz * normal, atol=1e-9)
        np.testing.assert_array_equal(f.load(), tiles[k].astype(np.float32))
        assert f.frame_index == k and f.extra["mosaic_tiles"] == n
    if count_from != "csa":
        return
    wrapper = MosaicWrapper(pydicom.dcmread(path))  # nibabel's reference algebra on the same file
    aff, data = wrapper.affine, wrapper.get_data()
    assert data.shape == (tr, tc, n)
    for k, f in enumerate(frames):
        np.testing.assert_allclose(f.position, (aff @ [0, 0, k, 1])[:3], atol=1e-6)
        far = f.position + (tr - 1) * spacing[0] * col_cos + (tc - 1) * spacing[1] * row_cos
        np.testing.assert_allclose(far, (aff @ [tr - 1, tc - 1, k, 1])[:3], atol=1e-6)
        np.testing.assert_array_equal(f.load(), data[:, :, k])


def test_mosaic_matches_dcm2niix(tmp_path: Path) -> None:
    """Same synthetic mosaic through dcm2niix: tile corners agree in world space, voxels agree."""
    import shutil
    import subprocess
    import sys

    import nibabel as nib

    exe = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix binary not installed")
    n, tr, tc = 5, 6, 8
    tiles = np.stack([ramp(tr, tc, 50 * k, 50 * k + 700, seed=k).astype(np.uint16) for k in range(n)])
    row_cos, col_cos = _rot_x(-20.0)
    (tmp_path / "in").mkdir()
    ds = make_mosaic(tiles, position=(30.0, -12.0, 5.0), orientation=(*row_cos, *col_cos), spacing=(1.8, 2.2),
                     slice_spacing=2.7)
    path = write(ds, tmp_path / "in" / "m.dcm")
    subprocess.run([exe, "-o", str(tmp_path), "-f", "ref", "-z", "n", str(tmp_path / "in")], check=True,
                   capture_output=True, timeout=60)
    ref = nib.load(tmp_path / "ref.nii")
    data = np.asarray(ref.dataobj)
    assert data.shape[:3] == (tc, tr, n)
    frames = frames_from_dataset(_read(path), path)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for k, f in enumerate(frames):
        for r, c in ((0, 0), (tr - 1, 0), (0, tc - 1), (tr - 1, tc - 1)):
            lps = f.position + r * f.pixel_spacing[0] * col_cos + c * f.pixel_spacing[1] * row_cos
            ras = (ref.affine @ [c, tr - 1 - r, k, 1])[:3]  # dcm2niix: x = column, y = rows bottom-up
            np.testing.assert_allclose(lps_to_ras @ lps, ras, atol=1e-3)
        np.testing.assert_array_equal(f.load(), data[:, ::-1, k].T)


def test_mosaic_reversed_csa_normal(tmp_path: Path) -> None:
    tiles = np.stack([np.full((4, 4), k + 1, np.uint16) for k in range(4)])
    ds = make_mosaic(tiles, position=(0, 0, 0), orientation=(1, 0, 0, 0, 1, 0), slice_normal=(0, 0, -1),
                     slice_spacing=2.0)
    frames = frames_from_dataset(ds, tmp_path / "m.dcm")  # in-memory dataset: pixels from ds
    np.testing.assert_allclose([f.position[2] for f in frames], [0.0, -2.0, -4.0, -6.0])
    assert [float(f.load()[0, 0]) for f in frames] == [1.0, 2.0, 3.0, 4.0]


def test_mosaic_without_count_quarantined(tmp_path: Path) -> None:
    ds = make_mosaic(np.ones((4, 4, 4), np.uint16), position=(0, 0, 0), orientation=(1, 0, 0, 0, 1, 0),
                     csa=False, private_count=False)
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "m.dcm")
    assert e.value.reason == "bad_mosaic"


# ---------------------------------------------------------------------------------------------------
# real data


def test_real_jpeg2000_ct_series(ct_dicom_dir: Path) -> None:
    files = sorted(ct_dicom_dir.iterdir())
    assert len(files) == 20
    frames = [f for p in files for f in frames_from_dataset(_read(p), p)]
    values = np.stack([f.load() for f in frames])
    assert values.shape == (20, 512, 512)
    assert (float(values.min()), float(values.max())) == (-1024.0, 1839.0)  # SOURCE.txt HU range
    assert {f.extra["transfer_syntax"] for f in frames} == {"JPEG 2000 Image Compression (Lossless Only)"}
    assert {f.extra["bits_stored"] for f in frames} == {12}
    z = sorted(float(f.position[2]) for f in frames)
    np.testing.assert_allclose([z[0], z[-1]], [-804.5, -766.5])
    assert frames[0].pixel_spacing == (0.9765625, 0.9765625) and frames[0].modality == "CT"


def test_real_ge_head_signed_padding(ge_head_dir: Path) -> None:
    files = sorted((ge_head_dir / "dicom").iterdir())
    assert len(files) == 28
    frames = [f for p in files for f in frames_from_dataset(_read(p, "header"), p)]
    assert {f.extra["pixel_padding_value"] for f in frames} == {-1500}
    values = np.stack([f.load() for f in frames[::9]])
    assert float(values.min()) == -1500.0 and float(values.max()) <= 2121.0
    assert ((values > -1100) & (values < -900)).any() and (values < -1024).any()  # air and signed values
    assert 0.15 < float((values[0] == -1500).mean()) < 0.35  # padding outside the FOV kept, ~24 %
    np.testing.assert_allclose(frames[0].orientation, [1, 0, 0, 0, 0.948324, -0.317305], atol=1e-6)


def test_deferred_pixels_not_kept_in_memory(ge_head_dir: Path) -> None:
    path = ge_head_dir / "dicom" / "01.dcm"
    ds = pydicom.dcmread(path, defer_size="64 KB")  # how medssl.data.dicom scans headers
    (frame,) = frames_from_dataset(ds, path)
    assert frame.load().shape == (512, 512)
    assert ds.get_item("PixelData", keep_deferred=True).value is None  # still deferred: re-read from the file


def test_enhanced_diffusion_temporal_keys(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    images, positions, _, _ = _enhanced_case(4)
    ds = make_enhanced(images, np.concatenate([positions[:2], positions[:2]]))  # 2 slices x 2 b-values
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        diff = Dataset()
        diff.DiffusionBValue = 0.0 if i < 2 else 800.0
        grad = Dataset()
        grad.DiffusionGradientOrientation = [0.0, 0.0, 1.0]
        diff.DiffusionGradientDirectionSequence = Sequence([grad])
        item.MRDiffusionSequence = Sequence([diff])
    frames = frames_from_dataset(ds, tmp_path / "dwi.dcm")
    assert [f.temporal_key for f in frames] == [("diffusion", 0.0, 0.0, 0.0, 1.0)] * 2 + [
        ("diffusion", 800.0, 0.0, 0.0, 1.0)] * 2
    assert frames[0].extra["temporal_candidates"]["stack_id"] == ("stack_id", "1")


@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le"])
def test_siemens_private_diffusion(syntax: str, tmp_path: Path) -> None:
    ds = make_slice(ramp(8, 8), modality="MR", Manufacturer="SIEMENS")
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", 1000)
    block.add_new(0x0E, "FD", [0.6, 0.8, 0.0])
    path = write(ds, tmp_path / "dwi.dcm", syntax)
    (f,) = frames_from_dataset(_read(path), path)
    assert f.temporal_key == ("diffusion", 1000.0, 0.6, 0.8, 0.0)


def test_multiframe_without_functional_groups(tmp_path: Path) -> None:
    ds = make_slice(np.zeros((8, 8), np.int16))
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 8, 8), "<i2").tobytes()
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "mf.dcm")
    assert e.value.reason == "no_geometry"


def test_color_and_degenerate_geometry(tmp_path: Path) -> None:
    ds = make_slice(np.zeros((8, 8), np.int16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "rgb.dcm")
    assert e.value.reason == "color_image"
    ds = make_slice(np.zeros((8, 8), np.int16), orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "bad.dcm")
    assert e.value.reason == "invalid_geometry"
    ds = make_slice(np.zeros((8, 8), np.int16), spacing=(0.0, 1.0))
    with pytest.raises(QuarantineError) as e:
        frames_from_dataset(ds, tmp_path / "bad.dcm")
    assert e.value.reason == "invalid_geometry"


def test_header_only_read_of_file_without_pixels(tmp_path: Path) -> None:
    ds = make_slice(ramp(8, 8))
    del ds.PixelData
    path = write(ds, tmp_path / "nopix.dcm")
    (frame,) = frames_from_dataset(_read(path, "header"), path)  # a header read cannot tell
    with pytest.raises(QuarantineError) as e:
        frame.load()
    assert e.value.reason == "non_image_object"


def test_phi_absent_from_every_flavour(tmp_path: Path) -> None:
    images, positions, slopes, intercepts = _enhanced_case(3)
    objects = {
        "slice": make_slice(ramp(8, 8), TriggerTime=10.0, AcquisitionNumber=2),
        "enhanced": make_enhanced(images, positions, slopes=slopes, intercepts=intercepts, temporal=[1, 2, 3]),
        "mosaic": make_mosaic(np.ones((4, 4, 4), np.uint16), position=(0, 0, 0), orientation=(1, 0, 0, 0, 1, 0)),
    }
    for name, ds in objects.items():
        path = write(ds, tmp_path / f"{name}.dcm", "rle")
        frames = frames_from_dataset(_read(path, "full"), path)
        _assert_no_phi([(f.extra, f.temporal_key, f.modality) for f in frames])
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID):
            assert uid not in repr([f.extra for f in frames])
