"""DICOM SEG writing, read back with highdicom: segments, names, codes, referenced source instances, and every
frame's pixels against its own source slice (decoded independently with pydicom) and the NIfTI output."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medssl.data.dicom import read_dicom_series
from medssl.deploy.dicom_seg import segment_codes, source_slice_indices, write_dicom_seg
from medssl.errors import MedsslError
from tests.data.dicom_factory import stack_positions, write_series
from tests.deploy._threshold import CLASS_NAMES, expected_labels, threshold_model

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along +y (P), columns down (-z): a sagittal stack along -x


def _source_hu(path: Path) -> np.ndarray:
    """A source slice's HU, decoded by pydicom alone (rows, cols)."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _sop_uid(path: Path) -> str:
    """SOPInstanceUID (TotalSegmentator's anonymised series leaves it empty: then the file meta's)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID


def _frames_by_source(seg: hd.seg.Segmentation) -> dict[str, dict[int, np.ndarray]]:
    """``{source SOPInstanceUID: {segment number: frame pixels}}`` from the per-frame functional groups."""
    out: dict[str, dict[int, np.ndarray]] = {}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out.setdefault(uid, {})[number] = pixels[i]
    return out


def _check_against_sources(seg_path: Path, files: list[Path], nifti_labels: np.ndarray, affine: np.ndarray,
                           n_classes: int) -> None:
    """Every frame = its source slice thresholded (pydicom decode) = the NIfTI plane its geometry maps to."""
    seg = hd.seg.segread(seg_path)
    by_uid = {_sop_uid(f): f for f in files}
    frames = _frames_by_source(seg)
    assert set(frames) <= set(by_uid)  # every frame references a slice of the source series
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert refs == set(by_uid)  # the SEG references the whole source series
    headers = [pydicom.dcmread(by_uid[u], stop_before_pixels=True) for u in by_uid]
    ks = dict(zip(by_uid, source_slice_indices(headers, affine, nifti_labels.shape), strict=True))
    for uid, path in by_uid.items():
        want = expected_labels(_source_hu(path))  # (rows, cols) from the source file alone
        got = np.zeros_like(want)
        for number, px in frames.get(uid, {}).items():
            got[px > 0] = number
        assert np.array_equal(got, want), f"frame of {path.name} differs from its source slice"
        assert np.array_equal(got, nifti_labels[:, ::-1, ks[uid]].T), f"frame of {path.name} != NIfTI plane"
    assert len(seg.SegmentSequence) == n_classes


@pytest.fixture(scope="module")
def sagittal_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], np.ndarray]:
    """A synthetic sagittal CT series (6 slices of 12×10, files named in reverse slice order) with HU
    patterns that hit all three threshold classes and differ per slice."""
    rng = np.random.default_rng(3)
    hu = rng.choice([-800, -20, 60, 700], size=(6, 12, 10)).astype(float)
    hu[:, 0, 0] = np.arange(6) * 100  # slice-specific value: a swapped frame cannot match
    folder = tmp_path_factory.mktemp("sag") / "series"
    files = write_series(folder, hu, positions=stack_positions((10.0, -5.0, 30.0), SAGITTAL, 6, 2.5),
                         orientation=SAGITTAL, naming="reverse")
    return folder, files, hu


def test_segment_codes_from_pydicom_dictionary() -> None:
    assert segment_codes("liver") == (codes.SCT.AnatomicalStructure, codes.SCT.Liver)
    assert segment_codes("Hippocampus")[1] == codes.SCT.Hippocampus
    assert segment_codes("soft_tissue") == (codes.SCT.Tissue, codes.SCT.SoftTissue)
    assert segment_codes("anterior") == (codes.SCT.Tissue, codes.SCT.Tissue)  # a qualifier is no structure


def test_seg_frames_follow_source_geometry(sagittal_series, tmp_path: Path) -> None:
    folder, files, _ = sagittal_series
    vol = read_dicom_series(folder)[0]
    labels = expected_labels(vol.array.astype(float))
    res = write_dicom_seg(labels, vol.affine, vol.source_files, tmp_path / "seg.dcm", class_names=CLASS_NAMES,
                          algorithm=("medssl-test", "1"))
    # files are named in reverse: source k must follow the geometry, not the names
    assert sorted(res.source_order) == list(range(6)) and res.source_order != list(range(6))
    _check_against_sources(res.path, files, labels, vol.affine, n_classes=2)
    seg = hd.seg.segread(res.path)
    names = [s.SegmentLabel for s in seg.SegmentSequence]
    assert names == ["soft_tissue", "bone"]
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert types == [codes.SCT.SoftTissue.value, codes.SCT.Tissue.value]
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert [r["frames"] for r in res.segments] == [
        int(np.any(labels == c, axis=(0, 1)).sum()) for c in (1, 2)]


def test_empty_class_described_or_left_out(sagittal_series, tmp_path: Path) -> None:
    folder, files, _ = sagittal_series
    vol = read_dicom_series(folder)[0]
    labels = (vol.array > 300.5).astype(np.uint8) * 2  # only "bone"
    res = write_dicom_seg(labels, vol.affine, vol.source_files, tmp_path / "a.dcm", class_names=CLASS_NAMES)
    assert res.empty_classes == ["soft_tissue"]
    seg = hd.seg.segread(res.path)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]  # segment number = class index
    assert {int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for fg in seg.PerFrameFunctionalGroupsSequence} == {2}
    res = write_dicom_seg(labels, vol.affine, vol.source_files, tmp_path / "b.dcm", class_names=CLASS_NAMES,
                          include_empty=False)
    seg = hd.seg.segread(res.path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bone"] and res.segments[0]["class_index"] == 2
    px = seg.get_pixels_by_source_instance(
        [_sop_uid(f) for f in files], combine_segments=True)
    hu = np.stack([_source_hu(f) for f in files])
    assert np.array_equal(px > 0, hu > 300.5)


def test_resampled_series_refused(tmp_path: Path) -> None:
    """A gantry-tilted stack resampled by the reader has no source slice per grid slice: refused, named."""
    hu = np.full((5, 8, 8), 40.0)
    orient = (1.0, 0.0, 0.0, 0.0, 0.95, -0.3122)
    pos = stack_positions((0.0, 0.0, 0.0), orient, 5, 3.0, shift=(0.0, 0.9, 0.0))
    write_series(tmp_path / "tilt", hu, positions=pos, orientation=orient, tilt=18.0)
    vol = read_dicom_series(tmp_path / "tilt", tilt="resample")[0]
    with pytest.raises(MedsslError, match="IM0001.dcm.*was the series resampled"):
        write_dicom_seg(np.ones(vol.array.shape, np.uint8), vol.affine, vol.source_files, tmp_path / "x.dcm",
                        class_names=CLASS_NAMES)
    with pytest.raises(MedsslError, match="outside the class table"):
        write_dicom_seg(np.full(vol.array.shape, 7, np.uint8), vol.affine, vol.source_files, tmp_path / "y.dcm",
                        class_names=CLASS_NAMES)


def test_predict_dicom_seg_real_series(totalseg_dir: Path, ge_head_dir: Path, tmp_path: Path) -> None:
    """The real JPEG 2000 CT series through `predict --dicom-seg` (threshold model): the SEG's frames equal the
    source slices thresholded and the NIfTI output; the gantry-tilted GE series is reported and skipped."""
    from medssl.deploy.predict import predict

    series = totalseg_dir / "example_ct_dicom"
    res = predict(threshold_model(), [series, ge_head_dir / "dicom"], tmp_path / "out", dicom_seg=True)
    assert res.exit_code == 1
    [bad] = res.failed
    assert bad["reason"] == "gantry_tilt+uneven_spacing" and bad["input"] == str(ge_head_dir / "dicom")
    [ok] = res.ok
    nii = nib.load(ok["outputs"]["seg"])
    vol = read_dicom_series(series)[0]
    assert nii.shape == vol.array.shape and np.allclose(nii.affine, vol.affine, atol=1e-4)
    labels = np.asarray(nii.dataobj)
    assert np.array_equal(labels, expected_labels(vol.array.astype(float)))
    files = sorted(p for p in series.iterdir() if p.is_file())
    _check_against_sources(Path(ok["outputs"]["dicom_seg"]), files, labels, vol.affine, n_classes=2)
    report = json.loads(res.report_path.read_text())
    row = next(c for c in report["cases"] if c["status"] == "ok")
    assert [s["label"] for s in row["dicom_seg"]["segments"]] == ["soft_tissue", "bone"]
    assert row["dicom_seg"]["empty_classes"] == []
