"""NIfTI loading/saving: round trips, scaling, failure reasons, real files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.nifti import load_nifti, orientation_code, save_nifti, spacing_from_affine
from medssl.errors import QuarantineError


def _rotated_affine(spacing=(0.8, 1.2, 2.5), origin=(-10.0, 20.0, 5.5), angle=0.3) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_save_load_round_trip_keeps_values_dtype_geometry(tmp_path: Path, ext: str):
    arr = np.random.default_rng(0).integers(-1024, 3000, (7, 9, 5)).astype(np.int16)
    aff = _rotated_affine()
    p = save_nifti(arr, aff, tmp_path / "sub" / f"v{ext}")
    vol = load_nifti(p)
    assert vol.array.dtype == np.int16 and vol.dtype == np.int16
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [0.8, 1.2, 2.5], atol=1e-6)
    assert vol.header["qform_code"] == 1 and vol.header["sform_code"] == 1
    assert vol.header["spatial_unit"] == "mm" and vol.header["scaled"] is False
    assert vol.header["format"] == "NIfTI-1"
    assert "descrip" not in vol.header  # free text may hold PHI
    # nibabel agrees on the written geometry (both qform and sform)
    img = nib.load(str(p))
    np.testing.assert_allclose(img.get_qform(), aff, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), aff, atol=1e-5)


def test_save_casts_exactly_or_refuses(tmp_path: Path):
    lab = np.zeros((4, 4, 4), np.float32)
    lab[1, 1, 1] = 2
    out = load_nifti(save_nifti(lab, np.eye(4), tmp_path / "l.nii.gz", dtype="uint8"))
    assert out.dtype == np.uint8 and out.array[1, 1, 1] == 2 and out.header["scaled"] is False
    with pytest.raises(ValueError, match="uint8"):
        save_nifti(np.full((4, 4, 4), 300, np.int16), np.eye(4), tmp_path / "x.nii", dtype=np.uint8)
    with pytest.raises(ValueError, match="int16"):
        save_nifti(np.full((4, 4, 4), 1.5, np.float32), np.eye(4), tmp_path / "y.nii", dtype=np.int16)
    with pytest.raises(ValueError, match="4, 4"):
        save_nifti(lab, np.eye(3), tmp_path / "z.nii")
    b = load_nifti(save_nifti(lab > 0, np.eye(4), tmp_path / "b.nii.gz"))
    assert b.dtype == np.uint8 and int(b.array.sum()) == 1


def test_scaled_file_is_scaled_unscaled_keeps_raw_dtype(tmp_path: Path):
    raw = np.arange(64, dtype=np.int16).reshape(4, 4, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    vol = load_nifti(tmp_path / "s.nii.gz")
    assert vol.dtype == np.int16 and vol.header["scaled"] is True
    assert vol.header["scl_slope"] == 2.0 and vol.header["scl_inter"] == -1.0
    np.testing.assert_allclose(vol.array, raw * 2.0 - 1.0)
    plain = load_nifti(save_nifti(raw, np.eye(4), tmp_path / "p.nii.gz"))
    assert plain.array.dtype == np.int16  # not get_fdata's float64


def test_4d_shape_kept_as_stored(tmp_path: Path):
    arr = np.ones((5, 6, 7, 3), np.float32)
    arr[0, 0, 0, 1] = 2
    vol = load_nifti(save_nifti(arr, np.eye(4), tmp_path / "f.nii"))
    assert vol.array.shape == (5, 6, 7, 3)


@pytest.fixture
def good_gz(tmp_path: Path) -> bytes:
    arr = np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32)
    return save_nifti(arr, np.eye(4), tmp_path / "good.nii.gz").read_bytes()


def _expect(path: Path, reason: str, detail_part: str = "") -> QuarantineError:
    with pytest.raises(QuarantineError) as ei:
        load_nifti(path)
    assert ei.value.reason == reason, ei.value
    assert ei.value.path == str(path) and ei.value.detail
    assert detail_part in ei.value.detail
    return ei.value


def test_empty_file(tmp_path: Path):
    (tmp_path / "e.nii.gz").write_bytes(b"")
    _expect(tmp_path / "e.nii.gz", "empty_file", "0 bytes")


def test_truncated_gzip_data_and_header(tmp_path: Path, good_gz: bytes):
    (tmp_path / "half.nii.gz").write_bytes(good_gz[: len(good_gz) // 2])
    _expect(tmp_path / "half.nii.gz", "truncated_file", "EOFError")
    (tmp_path / "head.nii.gz").write_bytes(good_gz[:60])  # gzip stream ends inside the 348-byte header
    _expect(tmp_path / "head.nii.gz", "truncated_file")
    # header complete but cut inside the data of an uncompressed file
    raw = gzip.decompress(good_gz)
    (tmp_path / "short.nii").write_bytes(raw[: 352 + 1000])
    _expect(tmp_path / "short.nii", "truncated_file", "Expected")
    (tmp_path / "tiny.nii").write_bytes(raw[:100])
    _expect(tmp_path / "tiny.nii", "truncated_file", "100 of 348")


def test_corrupt_gzip_crc(tmp_path: Path, good_gz: bytes):
    bad = bytearray(good_gz)
    bad[-6] ^= 0xFF  # inside the CRC32 trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    _expect(tmp_path / "crc.nii.gz", "truncated_file", "CRC")


def test_not_a_nifti(tmp_path: Path):
    rng = np.random.default_rng(2)
    (tmp_path / "r.nii").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _expect(tmp_path / "r.nii", "unreadable_nifti", "sizeof_hdr")
    (tmp_path / "r.nii.gz").write_bytes(gzip.compress(b"hello world, I am no image" * 40))
    _expect(tmp_path / "r.nii.gz", "unreadable_nifti", "sizeof_hdr")
    (tmp_path / "missing.nii").unlink(missing_ok=True)
    _expect(tmp_path / "missing.nii", "unreadable_nifti", "stat")


def test_orientation_codes():
    assert orientation_code(np.eye(4)) == "RAS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0, 1.0])) == "LPS"
    assert orientation_code(np.diag([-0.977, 0.977, 2.0, 1.0])) == "LAS"
    perm = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert orientation_code(perm) == "ASR"
    assert orientation_code(np.full((4, 4), np.nan)) == "???"
    np.testing.assert_allclose(spacing_from_affine(_rotated_affine()), [0.8, 1.2, 2.5])


def test_real_totalsegmentator_files(totalseg_dir: Path):
    ct = load_nifti(totalseg_dir / "example_ct_sm.nii.gz")
    assert ct.array.shape == (122, 101, 30) and ct.dtype == np.int16 and ct.array.dtype == np.int16
    np.testing.assert_allclose(ct.spacing, [3.0, 3.0, 3.0], atol=1e-4)
    assert orientation_code(ct.affine) == "RAS"
    assert (int(ct.array.min()), int(ct.array.max())) == (-1100, 1207)
    mr = load_nifti(totalseg_dir / "example_mr_sm.nii.gz")
    assert mr.array.shape == (117, 91, 20) and orientation_code(mr.affine) == "LPS"
    seg = load_nifti(totalseg_dir / "example_seg_dicom.nii.gz")
    assert seg.array.shape == (512, 512, 20) and orientation_code(seg.affine) == "LAS"
    np.testing.assert_allclose(seg.affine[:3, 3], [249.512, -61.512, -804.5], atol=1e-3)


def test_real_hippocampus_files(hippocampus_dir: Path, hippocampus_cases: int):
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))
    assert len(files) == hippocampus_cases  # dataset.json: 200 shared, 40 in the shipped sample
    for f in files[::8]:
        v = load_nifti(f)
        assert v.array.ndim == 3 and 24 <= min(v.array.shape) and max(v.array.shape) <= 59
        assert v.dtype in (np.float32, np.uint8)
        np.testing.assert_allclose(v.spacing, 1.0)
        np.testing.assert_allclose(v.affine, nib.load(str(f)).affine)
        assert tuple(v.affine[:3, 3]) in {(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)}  # 16 of 200 have origin 0
        assert orientation_code(v.affine) == "RAS"


def test_nifti2_and_hdr_img_pair(tmp_path: Path):
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    nib.save(nib.Nifti2Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "v2.nii.gz"))
    v = load_nifti(tmp_path / "v2.nii.gz")
    assert v.header["format"] == "NIfTI-2"
    np.testing.assert_array_equal(v.array, arr)
    np.testing.assert_allclose(v.spacing, 2.0)
    nib.save(nib.Nifti1Pair(arr, np.eye(4)), str(tmp_path / "pair.img"))
    np.testing.assert_array_equal(load_nifti(tmp_path / "pair.hdr").array, arr)
