"""Image/label validation reasons, label dtype conversion, geometry distance, intensity statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medssl.data.nifti import load_nifti
from medssl.data.validation import (
    MAX_SPACING_MM,
    MIN_SPACING_MM,
    MIN_SPATIAL_SIZE,
    grid_distance_mm,
    intensity_stats,
    squeeze_to_3d,
    validate_image,
    validate_label,
)
from medssl.errors import QuarantineError
from tests.conftest import SAMPLE


def _vol(shape=(10, 12, 8), seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(dtype)


def _reason(fn, *args, **kwargs) -> QuarantineError:
    with pytest.raises(QuarantineError) as ei:
        fn(*args, **kwargs)
    assert ei.value.detail and ei.value.path == "case.nii.gz"
    return ei.value


P = "case.nii.gz"


def test_squeeze_to_3d():
    assert squeeze_to_3d(_vol((4, 5, 6, 1)), P).shape == (4, 5, 6)
    assert squeeze_to_3d(_vol((4, 5, 6, 1, 1)), P).shape == (4, 5, 6)
    assert squeeze_to_3d(_vol((4, 5)), P).shape == (4, 5)  # left to validate_image
    e = _reason(squeeze_to_3d, _vol((4, 5, 6, 3)), P)
    assert e.reason == "not_3d" and "3 channels" in e.detail and "select a channel" in e.detail
    e = _reason(squeeze_to_3d, _vol((4, 5, 6, 1, 2)), P)
    assert e.reason == "not_3d" and "2 channels" in e.detail


def test_good_volumes_pass():
    validate_image(_vol(), np.eye(4), P)
    ct = np.random.default_rng(1).integers(-1024, 2000, (16, 16, 6)).astype(np.int16)
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    aff[:3, 3] = [-100, 20, -800]
    validate_image(ct, aff, P)
    validate_image(np.zeros((4, 4, 4), np.uint8) + np.eye(4, dtype=np.uint8)[None], np.eye(4), P)


@pytest.mark.parametrize("array,detail", [
    (_vol((16, 16)), "2D image"),
    (_vol((8, 8, 8, 2)), "2 channels"),
])
def test_not_3d(array, detail):
    e = _reason(validate_image, array, np.eye(4), P)
    assert e.reason == "not_3d" and detail in e.detail


def test_too_small():
    validate_image(_vol((MIN_SPATIAL_SIZE,) * 3), np.eye(4), P)
    e = _reason(validate_image, _vol((64, 64, MIN_SPATIAL_SIZE - 1)), np.eye(4), P)
    assert e.reason == "too_small" and "(64, 64, 3)" in e.detail


def test_non_finite_counts_nan_and_inf():
    v = _vol()
    v[1, 1, 1] = np.nan
    v[2, 2, 2] = np.inf
    v[3, 3, 3] = -np.inf
    e = _reason(validate_image, v, np.eye(4), P)
    assert e.reason == "non_finite" and "3 non-finite" in e.detail and "1 NaN" in e.detail and "2 Inf" in e.detail


def test_constant_names_value():
    e = _reason(validate_image, np.full((8, 8, 8), 7, np.int16), np.eye(4), P)
    assert e.reason == "constant" and "7" in e.detail


@pytest.mark.parametrize("diag", [
    [MIN_SPACING_MM / 2, 1, 1], [1, MAX_SPACING_MM * 2, 1], [1, 1, 0.0], [1, 0.001, 1],
])
def test_bad_spacing(diag):
    e = _reason(validate_image, _vol(), np.diag(diag + [1.0]), P)
    assert e.reason == "bad_spacing" and "mm" in e.detail


def test_spacing_bounds_are_inclusive():
    validate_image(_vol(), np.diag([MIN_SPACING_MM, MAX_SPACING_MM, 1, 1]), P)


def test_singular_affine():
    collinear = np.eye(4)
    collinear[:3, 1] = [1.0, 0, 0]  # voxel axes 0 and 1 point the same way
    assert _reason(validate_image, _vol(), collinear, P).reason == "singular_affine"
    nan = np.eye(4)
    nan[0, 3] = np.nan
    assert _reason(validate_image, _vol(), nan, P).reason == "singular_affine"
    bottom = np.eye(4)
    bottom[3, 0] = 1.0
    assert _reason(validate_image, _vol(), bottom, P).reason == "singular_affine"
    with pytest.raises(ValueError):
        validate_image(_vol(), np.eye(3), P)


def _label(shape=(10, 12, 8)) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    lab[2:5, 2:5, 2:5] = 1
    lab[5:8, 5:8, 5:7] = 2
    return lab


def test_label_ok_and_smallest_unsigned_dtype():
    out = validate_label(_label(), np.eye(4), (10, 12, 8), np.eye(4), P)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _label())
    big = _label()
    big[0, 0, 0] = 300
    assert validate_label(big, np.eye(4), big.shape, np.eye(4), P).dtype == np.uint16
    big[0, 0, 0] = 70_000
    assert validate_label(big, np.eye(4), big.shape, np.eye(4), P).dtype == np.uint32
    as_bool = validate_label(_label() > 0, np.eye(4), (10, 12, 8), np.eye(4), P)
    assert as_bool.dtype == np.uint8 and as_bool.max() == 1


def test_float_label_with_integers_is_converted_not_rejected():
    out = validate_label(_label().astype(np.float32), np.eye(4), (10, 12, 8), np.eye(4), P)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _label())


def test_label_reasons():
    lab = _label()
    e = _reason(validate_label, lab, np.eye(4), (10, 12, 9), np.eye(4), P)
    assert e.reason == "label_shape_mismatch" and "(10, 12, 8)" in e.detail and "(10, 12, 9)" in e.detail
    shifted = np.eye(4)
    shifted[1, 3] = 0.01
    e = _reason(validate_label, lab, shifted, lab.shape, np.eye(4), P)
    assert e.reason == "label_affine_mismatch" and "0.01 mm" in e.detail
    shifted[1, 3] = 1e-4  # below the 1e-3 mm tolerance
    validate_label(lab, shifted, lab.shape, np.eye(4), P)
    half = lab.astype(np.float32) * 0.5
    e = _reason(validate_label, half, np.eye(4), lab.shape, np.eye(4), P)
    assert e.reason == "label_not_integer" and "0.5" in e.detail
    nan = lab.astype(np.float64)
    nan[0, 0, 0] = np.nan
    assert _reason(validate_label, nan, np.eye(4), lab.shape, np.eye(4), P).reason == "label_not_integer"
    neg = lab.copy()
    neg[0, 0, 0] = -1
    e = _reason(validate_label, neg, np.eye(4), lab.shape, np.eye(4), P)
    assert e.reason == "label_negative" and "-1" in e.detail
    many = np.arange(10 * 12 * 8).reshape(10, 12, 8)
    e = _reason(validate_label, many, np.eye(4), many.shape, np.eye(4), P, max_classes=100)
    assert e.reason == "label_too_many_classes" and "960" in e.detail


def test_grid_distance_matches_brute_force():
    rng = np.random.default_rng(3)
    shape = (5, 7, 4)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    grid = np.c_[grid, np.ones(len(grid))]
    for _ in range(20):
        a, b = np.eye(4), np.eye(4)
        a[:3] += rng.normal(0, 0.1, (3, 4))
        b[:3] += rng.normal(0, 0.1, (3, 4))
        brute = np.linalg.norm((grid @ a.T - grid @ b.T)[:, :3], axis=1).max()
        assert grid_distance_mm(shape, a, b) == pytest.approx(brute, rel=1e-12)
    assert grid_distance_mm(shape, np.eye(4), np.eye(4)) == 0.0


def test_intensity_stats_exact_on_small_arrays():
    v = _vol((20, 20, 20), seed=4)
    st = intensity_stats(v)
    assert set(st) == {"min", "max", "mean", "std", "p0.5", "p1", "p50", "p99", "p99.5"}
    ref = np.percentile(v.astype(np.float64), [0.5, 1, 50, 99, 99.5])
    np.testing.assert_allclose([st["p0.5"], st["p1"], st["p50"], st["p99"], st["p99.5"]], ref)
    assert st["min"] == float(v.min()) and st["max"] == float(v.max())
    assert st["mean"] == pytest.approx(float(v.astype(np.float64).mean()))
    assert st["std"] == pytest.approx(float(v.astype(np.float64).std()))
    assert all(isinstance(x, float) for x in st.values())


def test_intensity_stats_ignores_non_finite_and_subsamples_large():
    v = _vol((10, 10, 10), seed=5)
    v[0, 0, 0] = np.nan
    st = intensity_stats(v)
    assert np.isfinite(list(st.values())).all()
    assert np.isnan(intensity_stats(np.full((3, 3, 3), np.nan))["p50"])
    big = np.random.default_rng(6).normal(0, 300, (160, 160, 100)).astype(np.float32)  # 2.56M voxels
    st = intensity_stats(big)
    ref = np.percentile(big, [1, 50, 99])
    assert st["min"] == float(big.min()) and st["max"] == float(big.max())  # min/max use every voxel
    assert abs(st["p1"] - ref[0]) < 5 and abs(st["p50"] - ref[1]) < 2 and abs(st["p99"] - ref[2]) < 5
    assert st["std"] == pytest.approx(300, rel=0.01)


def test_real_hippocampus_labels(hippocampus_dir: Path):
    # 003 and 243 are the two float32 label files (SOURCE.txt); the shipped sample holds 003 and 001, not 243
    names = ("hippocampus_003.nii.gz", "hippocampus_243.nii.gz", "hippocampus_001.nii.gz")
    present = [n for n in names if (hippocampus_dir / "imagesTr" / n).is_file()]
    assert len(present) == 3 or (hippocampus_dir == SAMPLE / "hippocampus" and "hippocampus_243.nii.gz" not in present
                                 and len(present) == 2)
    for name in present:
        img = load_nifti(hippocampus_dir / "imagesTr" / name)
        validate_image(squeeze_to_3d(img.array), img.affine, name)
        lab = load_nifti(hippocampus_dir / "labelsTr" / name)
        out = validate_label(squeeze_to_3d(lab.array), lab.affine, img.array.shape, img.affine, name)
        assert out.dtype == np.uint8 and set(np.unique(out).tolist()) == {0, 1, 2}
        np.testing.assert_array_equal(out, lab.array)
    assert load_nifti(hippocampus_dir / "labelsTr" / "hippocampus_003.nii.gz").dtype == np.float32
