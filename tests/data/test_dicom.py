"""Tests for medssl.data.dicom (+ medssl.data.resample): synthetic series from dicom_factory and real data."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from medssl.data.dicom import (
    find_dicom_files,
    group_dicom_files,
    load_series,
    read_dicom_files,
    read_dicom_series,
    save_nifti,
    scan_dicom,
)
from medssl.errors import QuarantineError
from tests.data.dicom_factory import PHI, expected_affine, stack_positions, write_series

_ROT = Rotation.from_euler("zx", [20, 30], degrees=True).as_matrix()
OBLIQUE = tuple(float(x) for x in np.concatenate([_ROT[:, 0], _ROT[:, 1]]))  # exactly orthonormal cosines
SPACING = (0.8, 0.7)
ORIGIN = (-12.5, 30.25, -80.0)


def _values(n: int = 8, rows: int = 16, cols: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, size=(n, rows, cols)).astype(np.float64)


def _nifti_order(values: np.ndarray) -> np.ndarray:
    """``(Z, rows, cols)`` → ``(X=cols, Y=rows bottom-up, Z)``: the expected array layout."""
    return values[:, ::-1, :].transpose(2, 1, 0)


def _write(folder: Path, values: np.ndarray, step: float = 2.5, **kw: object) -> list[Path]:
    pos = stack_positions(ORIGIN, OBLIQUE, values.shape[0], step)
    return write_series(folder, values, positions=pos, orientation=OBLIQUE, pixel_spacing=SPACING, **kw)


def _one(folder: Path, **options: object):
    vols = read_dicom_series(folder, **options)
    assert len(vols) == 1
    return vols[0]


# ----------------------------------------------------------------------------------------- synthetic
def test_round_trip_oblique_exact(tmp_path: Path) -> None:
    values = _values()
    _write(tmp_path / "s", values)
    vol = _one(tmp_path / "s")
    assert vol.array.dtype == np.int16 and vol.array.shape == (12, 16, 8)
    np.testing.assert_array_equal(vol.array, _nifti_order(values))
    np.testing.assert_allclose(vol.affine, expected_affine(ORIGIN, OBLIQUE, SPACING, 16, 2.5), atol=1e-5)
    assert vol.modality == "CT" and vol.temporal_index is None
    assert vol.meta["n_frames"] == 8 and vol.meta["manufacturer"] == "medssl-factory"
    assert vol.meta["kvp"] == 120.0 and vol.meta["slice_thickness"] == 2.0
    assert "resampled" not in vol.meta
    series, _ = scan_dicom(tmp_path / "s")
    for decode in ("threads", "processes"):  # both decode paths give the same volume
        (other,) = load_series(series[0], workers=2, decode=decode)
        np.testing.assert_array_equal(other.array, vol.array)


def test_float_values_give_float32(tmp_path: Path) -> None:
    values = _values(n=4) * 0.5  # slope 0.5 → half-integers
    _write(tmp_path / "s", values, slope=0.5, intercept=0.0, modality="MR")
    vol = _one(tmp_path / "s")
    assert vol.array.dtype == np.float32 and vol.modality == "MR"
    np.testing.assert_array_equal(vol.array, _nifti_order(values).astype(np.float32))


@pytest.mark.parametrize("naming,nested", [("reverse", False), ("shuffle", False), ("noext", True)])
def test_storage_order_and_names_do_not_matter(tmp_path: Path, naming: str, nested: bool) -> None:
    values = _values(n=6, seed=1)
    _write(tmp_path / "ref", values)
    _write(tmp_path / "alt", values, naming=naming, nested=nested, seed=3)
    ref, alt = _one(tmp_path / "ref"), _one(tmp_path / "alt")
    np.testing.assert_array_equal(ref.array, alt.array)
    np.testing.assert_allclose(ref.affine, alt.affine, atol=1e-9)
    assert len(find_dicom_files([tmp_path / "alt"])) == 6


def test_missing_slice_is_quarantined_with_position(tmp_path: Path) -> None:
    values = _values(n=7)
    pos = stack_positions((0, 0, 0), (1, 0, 0, 0, 1, 0), 8, 3.0)
    keep = [0, 1, 2, 4, 5, 6, 7]  # slice 3 at z = 9 mm is missing
    write_series(tmp_path / "s", values, positions=pos[keep])
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(tmp_path / "s")
    assert ei.value.reason == "missing_slices"
    assert "1 slice(s) missing" in ei.value.detail and "(0.00, 0.00, 9.00)" in ei.value.detail
    # never rescued by resampling options
    with pytest.raises(QuarantineError, match="missing_slices"):
        read_dicom_series(tmp_path / "s", tilt="resample", uneven="resample")


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    a, b = _values(n=5, seed=1), _values(n=3, rows=10, cols=9, seed=2)
    _write(tmp_path / "mix", a, series_number=3)
    pos_b = stack_positions((5, 5, 5), (1, 0, 0, 0, 1, 0), 3, 1.5)
    write_series(tmp_path / "mix", b, positions=pos_b, series_number=7, naming="shuffle", modality="MR",
                 intercept=0.0)
    series, bad = scan_dicom(tmp_path / "mix")
    assert not bad and len(series) == 2
    labels = sorted(s.label for s in series)
    assert labels == ["CT series 3 (5 files) in mix", "MR series 7 (3 files) in mix"]
    vols = {s.label.split()[0]: load_series(s)[0] for s in series}
    np.testing.assert_array_equal(vols["CT"].array, _nifti_order(a))
    np.testing.assert_array_equal(vols["MR"].array, _nifti_order(b))
    np.testing.assert_allclose(vols["MR"].affine, expected_affine((5, 5, 5), (1, 0, 0, 0, 1, 0), (0.8, 0.7), 10,
                                                                  1.5), atol=1e-5)
    groups, bad = group_dicom_files([tmp_path / "mix"])
    assert sorted(len(f) for f, _ in groups) == [3, 5] and bad == []
    files_ct = next(f for f, label in groups if label.startswith("CT"))
    np.testing.assert_array_equal(read_dicom_files(files_ct)[0].array, _nifti_order(a))


def test_mixed_image_sizes_quarantined(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    pos = stack_positions((0, 0, 0), (1, 0, 0, 0, 1, 0), 5, 2.0)
    write_series(tmp_path / "s", _values(n=4), positions=pos[:4], series_uid=uid)
    write_series(tmp_path / "s" / "x", _values(n=1, rows=20, cols=20), positions=pos[4:], series_uid=uid)
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(tmp_path / "s")
    assert ei.value.reason == "mixed_image_size"
    assert "16x12 (4 frames)" in ei.value.detail and "20x20 (1 frames)" in ei.value.detail


def test_duplicate_positions_quarantined(tmp_path: Path) -> None:
    pos = stack_positions((0, 0, 0), (1, 0, 0, 0, 1, 0), 5, 2.0)
    write_series(tmp_path / "s", _values(n=6), positions=np.vstack([pos, pos[2:3]]))
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(tmp_path / "s")
    assert ei.value.reason == "duplicate_slices" and "4.00 mm" in ei.value.detail


def test_four_d_split_or_quarantine(tmp_path: Path) -> None:
    n_pos, n_t = 4, 3
    values = _values(n=n_pos * n_t, seed=5)
    pos = stack_positions(ORIGIN, OBLIQUE, n_pos, 3.0)
    write_series(tmp_path / "s", values, positions=np.tile(pos, (n_t, 1)), orientation=OBLIQUE, modality="MR",
                 intercept=0.0, temporal=np.repeat(np.arange(1, n_t + 1), n_pos), naming="shuffle")
    vols = read_dicom_series(tmp_path / "s")
    assert [v.temporal_index for v in vols] == [0, 1, 2]
    for t, v in enumerate(vols):
        np.testing.assert_array_equal(v.array, _nifti_order(values[t * n_pos:(t + 1) * n_pos]))
        np.testing.assert_allclose(v.affine, expected_affine(ORIGIN, OBLIQUE, (0.8, 0.7), 16, 3.0), atol=1e-5)
    assert len({v.identity for v in vols}) == 3
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(tmp_path / "s", four_d="quarantine")
    assert ei.value.reason == "four_d" and "3 volumes of 4 slices" in ei.value.detail


def test_four_d_split_by_acquisition_number(tmp_path: Path) -> None:
    """Without a temporal position, the acquisition number separates the repeated positions."""
    values = _values(n=6, seed=6)
    pos = stack_positions((0, 0, 0), (1, 0, 0, 0, 1, 0), 3, 2.0)
    paths = write_series(tmp_path / "s", values, positions=np.tile(pos, (2, 1)), temporal=[1, 1, 1, 2, 2, 2])
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.TemporalPositionIdentifier
        ds.save_as(p)
    vols = read_dicom_series(tmp_path / "s")
    assert [v.temporal_index for v in vols] == [0, 1]
    np.testing.assert_array_equal(vols[1].array, _nifti_order(values[3:]))
    # a CT with per-slice acquisition numbers and distinct positions stays one 3D volume
    write_series(tmp_path / "ct", values[:3], positions=pos, temporal=[4, 5, 6])
    assert [v.temporal_index for v in read_dicom_series(tmp_path / "ct")] == [None]


def test_gantry_tilt_tag_without_sheared_positions_is_a_note(tmp_path: Path) -> None:
    values = _values(n=4)
    _write(tmp_path / "s", values, tilt=12.0)
    vol = _one(tmp_path / "s")  # positions are orthogonal: nothing to correct, but say so
    np.testing.assert_array_equal(vol.array, _nifti_order(values))
    assert vol.meta["notes"] == ["GantryDetectorTilt 12 deg but slice positions are orthogonal"]


def test_bad_files_are_reported_and_good_series_still_read(tmp_path: Path) -> None:
    values = _values(n=4)
    paths = _write(tmp_path / "d", values)
    (tmp_path / "d" / "random.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "d" / "empty.dcm").write_bytes(b"")
    (tmp_path / "d" / "README.txt").write_text("notes about this scan\n")
    (tmp_path / "d" / "noext_text").write_text("just text, no extension\n")
    sr = pydicom.Dataset()  # a structured report: no pixels
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    sr.Modality, sr.SeriesInstanceUID = "SR", generate_uid()
    sr.save_as(tmp_path / "d" / "report.dcm", enforce_file_format=True)
    # one slice stored as raw DICOM: no preamble, no file meta, implicit VR, no extension
    ds = pydicom.dcmread(paths[1])
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "d" / "raw_slice", implicit_vr=True, little_endian=True, enforce_file_format=False)
    paths[1].unlink()
    series, bad = scan_dicom(tmp_path / "d")
    assert len(series) == 1 and len(series[0].files) == 4
    np.testing.assert_array_equal(load_series(series[0])[0].array, _nifti_order(values))
    reasons = {Path(e.path).name: e.reason for e in bad}
    assert reasons == {"random.dcm": "unreadable_dicom", "empty.dcm": "empty_file", "report.dcm": "non_image_object"}
    assert all(e.detail for e in bad)
    with pytest.raises(QuarantineError, match="unreadable_dicom"):
        read_dicom_files([tmp_path / "d" / "random.dcm"])
    # files handed over explicitly (ingest candidates): an empty one is reported whatever its name
    (tmp_path / "blank").write_bytes(b"")
    groups, bad = group_dicom_files([*paths[:1], tmp_path / "blank", tmp_path / "d" / "README.txt"])
    assert len(groups) == 1 and [(Path(p).name, r) for p, r, _ in bad] == [("blank", "empty_file")]


def test_bad_options_raise_value_error(tmp_path: Path) -> None:
    _write(tmp_path / "s", _values(n=3))
    series, _ = scan_dicom(tmp_path / "s")
    for kw in ({"tilt": "fix"}, {"uneven": "x"}, {"four_d": "merge"}, {"target_slice_spacing": 0.0},
               {"decode": "gpu"}):
        with pytest.raises(ValueError):
            load_series(series[0], **kw)


def _linear_world(pos_lps: np.ndarray) -> np.ndarray:
    """A smooth test field: linear in LPS position, so linear interpolation reproduces it exactly."""
    return 0.5 * pos_lps[..., 0] - 0.75 * pos_lps[..., 1] + 1.25 * pos_lps[..., 2] + 10.0


def _tilted_uneven_series(folder: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Axial-ish slices tilted 15 deg about x, stacked along z with uneven steps (like the GE head CT)."""
    t = np.radians(15.0)
    orient = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))
    z_steps = [3.0, 3.0, 3.0, 1.0, 5.0, 5.0]
    z = np.concatenate([[0.0], np.cumsum(z_steps)])
    pos = np.stack([np.full_like(z, -5.0), np.full_like(z, -4.0), z - 20.0], axis=1)
    rows, cols, ps = 14, 10, (1.0, 1.0)
    u, v = np.array(orient[:3]), np.array(orient[3:])
    r, c = np.mgrid[0:rows, 0:cols]
    world = pos[:, None, None, :] + c[None, ..., None] * ps[1] * u + r[None, ..., None] * ps[0] * v
    write_series(folder, _linear_world(world), positions=pos, orientation=orient, pixel_spacing=ps,
                 slope=0.01, intercept=0.0, tilt=15.0)
    return pos, orient


def test_tilt_and_uneven_default_quarantine(tmp_path: Path) -> None:
    _tilted_uneven_series(tmp_path / "s")
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(tmp_path / "s")
    assert ei.value.reason == "gantry_tilt+uneven_spacing"
    assert "gantry tilt 15.0 deg" in str(ei.value) and "GantryDetectorTilt 15 deg" in str(ei.value)
    assert "3.00 mm x3, 1.00 mm x1, 5.00 mm x2" in str(ei.value)
    with pytest.raises(QuarantineError) as ei:  # only the unresolved problem remains
        read_dicom_series(tmp_path / "s", tilt="resample")
    assert ei.value.reason == "uneven_spacing"


@pytest.mark.parametrize("target", [None, 0.8])
def test_tilt_and_uneven_resample_true_positions(tmp_path: Path, target: float | None) -> None:
    pos, orient = _tilted_uneven_series(tmp_path / "s")
    vol = _one(tmp_path / "s", tilt="resample", uneven="resample", target_slice_spacing=target)
    a = vol.affine[:3, :3]
    gram = a.T @ a
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9)  # orthogonal grid
    normal_ras = np.cross(orient[:3], orient[3:]) * [-1, -1, 1]
    step = target or float(np.median(np.diff(pos[:, 2])) * np.cos(np.radians(15.0)))
    np.testing.assert_allclose(a[:, 2], normal_ras * step, atol=1e-6)
    assert "gantry_tilt 15.0 deg" in vol.meta["resampled"] and "uneven spacing" in vol.meta["resampled"]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ a.T + vol.affine[:3, 3]
    expect = _linear_world(ras * [-1, -1, 1])
    got = vol.array.reshape(-1)
    inside = got != got.min()  # outside every slice holds the fill value (the stack minimum)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got[inside], expect[inside], atol=0.02)  # storage rounding 0.005


def test_save_nifti_round_trip(tmp_path: Path) -> None:
    values = _values(n=3)
    _write(tmp_path / "s", values)
    vol = _one(tmp_path / "s")
    img = nib.load(save_nifti(vol, tmp_path / "out" / "v.nii.gz"))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array)
    np.testing.assert_allclose(img.get_sform(), vol.affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), vol.affine, atol=1e-4)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units() == ("mm", "sec")


def test_no_phi_anywhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    uid = "1.2.826.0.1.3680043.8.498.777"
    _write(tmp_path / "ok", _values(n=4), series_uid=uid)
    pos = stack_positions((0, 0, 0), (1, 0, 0, 0, 1, 0), 6, 2.0)
    write_series(tmp_path / "gap", _values(n=5), positions=pos[[0, 1, 3, 4, 5]], series_uid=uid + "1")
    (tmp_path / "ok" / "junk.dcm").write_bytes(b"\x08\x00" + bytes(500))
    series, bad = scan_dicom(tmp_path, workers=2)
    texts = [repr(series), repr(bad)] + [str(e) for e in bad]
    for s in series:
        try:
            vols = load_series(s)
            texts += [repr(vols), json.dumps([v.meta for v in vols], default=str)]
        except QuarantineError as e:
            texts += [str(e), e.detail, e.reason]
    texts.append(caplog.text)
    blob = "\n".join(texts)
    assert "missing_slices" in blob and "CT series 1" in blob
    for secret in [*PHI.values(), "Sentinel", "20240102", uid]:
        assert secret not in blob


# ----------------------------------------------------------------------------------------- real data
def _dcm2niix(src: Path, out: Path) -> list[Path]:
    exe = shutil.which("dcm2niix") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dcm2niix")
    if not Path(exe).exists():
        pytest.skip("dcm2niix binary not available")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-o", str(out), "-f", "ref", str(src)], check=True, capture_output=True,
                   timeout=120)
    return sorted(out.glob("ref*.nii"))


def _in_grid(vol_affine: np.ndarray, ref: nib.Nifti1Image, ijk: np.ndarray) -> np.ndarray:
    """Voxel coordinates of our voxels ``ijk`` ``(N, 3)`` in ``ref``'s voxel grid (world-space mapping)."""
    m = np.linalg.inv(ref.affine) @ vol_affine
    return ijk @ m[:3, :3].T + m[:3, 3]


def test_totalseg_ct_geometry_hu_and_dcm2niix(totalseg_dir: Path, tmp_path: Path) -> None:
    vol = _one(totalseg_dir / "example_ct_dicom")
    seg = nib.load(totalseg_dir / "example_seg_dicom.nii.gz")
    assert vol.array.shape == seg.shape == (512, 512, 20) and vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.affine, seg.affine, atol=1e-3)
    lab = np.asarray(seg.dataobj)
    for label, hu in ((5, 89), (1, 80), (52, 177), (0, -742)):  # SOURCE.txt: liver, spleen, aorta, background
        assert abs(vol.array[lab == label].mean() - hu) < 2, label
    assert vol.array.min() == -1024 and vol.array.max() == 1839
    assert "JPEG 2000" in vol.meta["transfer_syntax"] and vol.meta["convolution_kernel"].startswith("Br38f")
    (ref_path,) = _dcm2niix(totalseg_dir / "example_ct_dicom", tmp_path / "d2n")
    ref = nib.load(ref_path)
    ijk = np.stack(np.meshgrid(*[np.arange(0, s, 7) for s in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
    theirs = _in_grid(vol.affine, ref, ijk)
    np.testing.assert_allclose(theirs, np.rint(theirs), atol=1e-3)  # same grid up to axis order / flips
    idx = np.rint(theirs).astype(int)
    raw = ref.dataobj.get_unscaled()  # dcm2niix stores raw values + scl_slope/scl_inter
    ref_vals = raw[idx[:, 0], idx[:, 1], idx[:, 2]] * ref.dataobj.slope + ref.dataobj.inter
    np.testing.assert_array_equal(vol.array[ijk[:, 0], ijk[:, 1], ijk[:, 2]], ref_vals)


def test_ge_head_tilt_default_quarantine(ge_head_dir: Path) -> None:
    with pytest.raises(QuarantineError) as ei:
        read_dicom_series(ge_head_dir / "dicom")
    e = ei.value
    assert e.reason == "gantry_tilt+uneven_spacing"
    msg = str(e)
    assert "gantry tilt 18.5 deg" in msg and "GantryDetectorTilt 18.5 deg" in msg
    assert "4.22 mm x13, 1.14 mm x1, 7.38 mm x13" in msg


def test_ge_head_resampled_matches_slices_and_dcm2niix(ge_head_dir: Path, tmp_path: Path) -> None:
    series, _ = scan_dicom(ge_head_dir / "dicom")
    vol = load_series(series[0], tilt="resample", uneven="resample")[0]
    a = vol.affine[:3, :3]
    gram = a.T @ a
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6)
    assert "gantry_tilt 18.5 deg" in vol.meta["resampled"]
    inv = np.linalg.inv(vol.affine)
    frames = sorted(series[0].frames, key=lambda f: float(f.position[2]))
    r, c = np.mgrid[206:306:3, 206:306:3]  # centre of the head
    on_plane = 0
    for k, f in enumerate(frames):
        u, v = np.asarray(f.orientation[:3]), np.asarray(f.orientation[3:])
        lps = f.position + c[..., None] * f.pixel_spacing[1] * u + r[..., None] * f.pixel_spacing[0] * v
        ijk = (lps * [-1, -1, 1]).reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
        assert np.ptp(ijk[:, 2]) < 1e-6  # every pixel of an original slice maps to one normal coordinate
        if abs(ijk[0, 2] - round(ijk[0, 2])) > 0.05:
            continue  # slice lies between output planes: values there are a through-plane blend
        on_plane += 1
        ours = map_coordinates(vol.array, ijk.T, order=1, mode="nearest")  # z may be -1e-15
        orig = f.load()[r, c].reshape(-1)
        if k == 0:  # plane 0 is slice 0 on its own pixel grid: exact
            np.testing.assert_allclose(ours, orig, atol=1e-3)
        else:  # interpolated twice in-plane (ours, then map_coordinates here): small errors
            assert np.median(np.abs(ours - orig)) < 3 and np.corrcoef(ours, orig)[0, 1] > 0.99, k
    assert on_plane >= 14  # the 13 equal 4 mm steps put slices 0-13 on output planes
    refs = [p for p in _dcm2niix(ge_head_dir / "dicom", tmp_path / "d2n") if "Tilt" in p.name]
    if not refs:
        pytest.skip("dcm2niix wrote no tilt-corrected volume")
    ref = nib.load(refs[0])
    ijk = np.stack(np.meshgrid(*[np.arange(0, s, 4) for s in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
    theirs = _in_grid(vol.affine, ref, ijk)
    inside = np.all((theirs >= 0) & (theirs <= np.array(ref.shape) - 1), axis=1)
    ours = vol.array[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    ref_vals = map_coordinates(np.asarray(ref.dataobj, dtype=np.float32), theirs[inside].T, order=1)
    both = (ours[inside] > -1000) & (ref_vals > -1000)  # inside the scanned FOV on both sides
    assert both.sum() > 10000
    assert np.corrcoef(ours[inside][both], ref_vals[both])[0, 1] > 0.99
