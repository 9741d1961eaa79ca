"""End-to-end ingest: real datasets, the bad-input corpus, re-runs, workers and PHI."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.ingest import IngestOptions, ingest


def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _good_volume(seed: int, shape=(12, 14, 10)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _good_label(shape=(12, 14, 10)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[3:6, 3:6, 3:6] = 1
    lab[6:9, 6:9, 6:9] = 2
    return lab


@pytest.fixture
def nifti_corpus(tmp_path: Path) -> Path:
    """Good cases plus every NIfTI-level bad input of issue 3."""
    src = tmp_path / "src"
    for i in range(3):
        _nii(src / "imagesTr" / f"good{i}.nii.gz", _good_volume(i))
        _nii(src / "labelsTr" / f"good{i}.nii.gz", _good_label())
    _nii(src / "imagesTr" / "unlab.nii.gz", _good_volume(9))
    (src / "imagesTr" / "zero.nii.gz").write_bytes(b"")
    data = (src / "imagesTr" / "good0.nii.gz").read_bytes()
    (src / "imagesTr" / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nan = _good_volume(3)
    nan[2, 2, 2] = np.nan
    nan[3, 3, 3] = np.inf
    _nii(src / "imagesTr" / "nan.nii.gz", nan)
    _nii(src / "imagesTr" / "flat2d.nii.gz", _good_volume(4, (16, 16)))
    _nii(src / "imagesTr" / "multichannel.nii.gz", _good_volume(5, (12, 14, 10, 3)))
    _nii(src / "imagesTr" / "const.nii.gz", np.full((12, 14, 10), 7, np.float32))
    _nii(src / "imagesTr" / "wrongshape.nii.gz", _good_volume(6))
    _nii(src / "labelsTr" / "wrongshape.nii.gz", _good_label((12, 14, 11)))
    _nii(src / "imagesTr" / "floatlab.nii.gz", _good_volume(7))
    _nii(src / "labelsTr" / "floatlab.nii.gz", _good_label().astype(np.float32) * 0.5)
    return src


EXPECTED_REASONS = {
    "zero.nii.gz": "empty_file",
    "truncated.nii.gz": "truncated_file",
    "nan.nii.gz": "non_finite",
    "flat2d.nii.gz": "not_3d",
    "multichannel.nii.gz": "not_3d",
    "const.nii.gz": "constant",
}


def test_bad_nifti_inputs_are_quarantined_with_reasons_and_good_ones_kept(nifti_corpus: Path, tmp_path: Path):
    report = ingest([nifti_corpus], tmp_path / "out", options=IngestOptions(salt="s"))
    q = {Path(r["path"]).name + ("@label" if "labelsTr" in r["path"] else ""): r for r in report.quarantined}
    for name, reason in EXPECTED_REASONS.items():
        assert q[name]["reason"] == reason, (name, q.get(name))
        assert q[name]["detail"], name
    assert q["wrongshape.nii.gz@label"]["reason"] == "label_shape_mismatch"
    assert "11" in q["wrongshape.nii.gz@label"]["detail"]
    assert q["floatlab.nii.gz@label"]["reason"] == "label_not_integer"
    assert report.exit_code == 3
    # good cases survive; images whose label was bad stay as unlabeled volumes
    assert report.counts["training"] == 3
    assert report.counts["unlabeled"] == 3  # unlab + wrongshape + floatlab
    rows = _rows(report.quarantine)
    assert {r["reason"] for r in rows} >= set(EXPECTED_REASONS.values())
    manifest = _rows(report.manifest)
    assert len(manifest) == 6
    assert all(len(r["sha256"]) == 64 for r in manifest)


def test_datalist_loads_with_monai_and_paths_resolve(nifti_corpus: Path, tmp_path: Path):
    from monai.data import load_decathlon_datalist

    report = ingest([nifti_corpus], tmp_path / "out", options=IngestOptions(salt="s"))
    items = load_decathlon_datalist(str(report.datalist), data_list_key="training")
    assert len(items) == 3
    for it in items:
        assert Path(it["image"]).is_file() and Path(it["label"]).is_file()
        assert it["case_id"].startswith("c") and "good" not in it["case_id"]
    unl = load_decathlon_datalist(str(report.datalist), data_list_key="unlabeled", is_segmentation=False)
    assert len(unl) == 3


def test_rerun_skips_unchanged_and_redoes_changed(nifti_corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = ingest([nifti_corpus], out, options=IngestOptions(salt="s"))
    again = ingest([nifti_corpus], out, options=IngestOptions(salt="s"))
    assert again.processed == 0 and again.reused == 12
    assert (out / "datalist.json").read_text() == first.datalist.read_text()
    # a changed file is processed again
    _nii(nifti_corpus / "imagesTr" / "nan.nii.gz", _good_volume(11))
    third = ingest([nifti_corpus], out, options=IngestOptions(salt="s"))
    assert third.processed == 1
    assert "nan.nii.gz" not in {Path(r["path"]).name for r in third.quarantined}
    assert third.counts["unlabeled"] == 4


def test_two_workers_give_identical_outputs(nifti_corpus: Path, tmp_path: Path):
    a = ingest([nifti_corpus], tmp_path / "a", workers=1, options=IngestOptions(salt="s"))
    b = ingest([nifti_corpus], tmp_path / "b", workers=2, options=IngestOptions(salt="s"))
    da, db = json.loads(a.datalist.read_text()), json.loads(b.datalist.read_text())
    assert {k: v for k, v in da.items() if k != "name"} == {k: v for k, v in db.items() if k != "name"}
    assert a.manifest.read_text() == b.manifest.read_text()
    assert a.quarantine.read_text().replace(str(tmp_path), "") == b.quarantine.read_text().replace(str(tmp_path), "")


def test_copy_nifti_hides_original_names(nifti_corpus: Path, tmp_path: Path):
    report = ingest([nifti_corpus], tmp_path / "out", options=IngestOptions(salt="s", copy_nifti=True))
    text = report.datalist.read_text() + report.manifest.read_text()
    assert "good0" not in text and "imagesTr" not in text
    dl = json.loads(report.datalist.read_text())
    assert all((report.out / it["image"]).is_file() for it in dl["training"])


def test_salt_changes_case_ids_and_is_persisted(nifti_corpus: Path, tmp_path: Path):
    a = json.loads(ingest([nifti_corpus], tmp_path / "a").datalist.read_text())
    a2 = json.loads(ingest([nifti_corpus], tmp_path / "a").datalist.read_text())
    b = json.loads(ingest([nifti_corpus], tmp_path / "b").datalist.read_text())
    ids = lambda d: sorted(it["case_id"] for it in d["training"])  # noqa: E731
    assert ids(a) == ids(a2)  # persisted salt: stable ids on re-run
    assert ids(a) != ids(b)  # different output folder, different random salt


def test_no_input_found_is_an_error(tmp_path: Path):
    from medssl.errors import MedsslError

    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsslError, match="no NIfTI"):
        ingest([tmp_path / "empty"], tmp_path / "out")


def test_hippocampus_200_cases_with_labels(hippocampus_dir: Path, hippocampus_cases: int, tmp_path: Path):
    """Every case of the MSD folder (200 labelled in the shared copy; 40 labelled + 20 image-only in the sample)."""
    from monai.data import load_decathlon_datalist

    unlabeled = json.loads((hippocampus_dir / "dataset.json").read_text())["numTest"]  # imagesTs: no labels
    report = ingest([hippocampus_dir], tmp_path / "out", options=IngestOptions(salt="s"))
    assert report.quarantined == []
    assert report.counts["training"] == hippocampus_cases and report.counts["unlabeled"] == unlabeled
    items = load_decathlon_datalist(str(report.datalist), data_list_key="training")
    assert len({it["case_id"] for it in items}) == hippocampus_cases
    manifest = _rows(report.manifest)
    assert {r["modality"] for r in manifest} == {"MRI"}
    labelled = [r for r in manifest if r["label"]]
    assert len(labelled) == hippocampus_cases and all(r["label_classes"] == "0 1 2" for r in labelled)
    assert all(r["spacing_mm"] == "1,1,1" for r in manifest)
    maxes = [float(r["max"]) for r in manifest]
    assert max(maxes) / min(maxes) > 1000  # the wildly varying MRI scales are visible in the manifest


def test_medmnist_1584_volumes_with_classes(medmnist_dir: Path, tmp_path: Path):
    report = ingest([medmnist_dir / "adrenalmnist3d.npz"], tmp_path / "out", options=IngestOptions(salt="s"))
    assert report.quarantined == []
    dl = json.loads(report.datalist.read_text())
    assert (len(dl["training"]), len(dl["validation"]), len(dl["test"])) == (1188, 98, 298)
    counts = {s: np.bincount([it["class"] for it in dl[s]]).tolist() for s in ("training", "validation", "test")}
    assert counts == {"training": [929, 259], "validation": [76, 22], "test": [229, 69]}
    assert all(it["group_id"] == it["case_id"] for s in ("training", "validation", "test") for it in dl[s])


def test_truncated_gzip_detail_names_the_file(tmp_path: Path):
    src = tmp_path / "src"
    _nii(src / "a.nii.gz", _good_volume(0))
    raw = gzip.decompress((src / "a.nii.gz").read_bytes())
    (src / "b.nii.gz").write_bytes(gzip.compress(raw)[:-30])
    shutil.copy(src / "a.nii.gz", src / "c.nii.gz")
    report = ingest([src], tmp_path / "out", options=IngestOptions(salt="s"))
    q = {Path(r["path"]).name: r for r in report.quarantined}
    assert set(q) == {"b.nii.gz"}
    assert str(src / "b.nii.gz") in q["b.nii.gz"]["path"]
    assert report.counts["unlabeled"] == 2


def test_dicom_bad_inputs_and_phi_free_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Random bytes named .dcm, a series with a missing slice and two series mixed in one folder; the
    outputs and logs never contain the PHI sentinels of the test DICOMs."""
    import logging

    from tests.data.dicom_factory import PHI, stack_positions, write_series

    rng = np.random.default_rng(0)
    src = tmp_path / "pacs"
    orient = (1, 0, 0, 0, 1, 0)
    vol = rng.integers(-200, 300, (8, 12, 10)).astype(np.float32)
    # two good series in ONE folder
    write_series(src / "mixed", vol, positions=stack_positions((0, 0, 0), orient, 8, 2.0), series_number=1)
    write_series(src / "mixed", vol[:6] + 5, positions=stack_positions((5, 5, 5), orient, 6, 3.0),
                 series_number=2, naming="shuffle")
    # a series with slice 4 missing
    paths = write_series(src / "gap", vol, positions=stack_positions((0, 0, 0), orient, 8, 2.0), series_number=3)
    paths[4].unlink()
    # random bytes named .dcm, and a zero-byte file
    (src / "junk").mkdir()
    (src / "junk" / "random.dcm").write_bytes(b"DICM" + rng.bytes(2000))
    (src / "junk" / "empty.dcm").write_bytes(b"")
    caplog.set_level(logging.DEBUG, logger="medssl")
    report = ingest([src], tmp_path / "out", options=IngestOptions(salt="s"))
    reasons = {r["reason"] for r in report.quarantined}
    assert "missing_slices" in reasons, report.quarantined
    assert any(Path(r["path"]).name == "random.dcm" for r in report.quarantined), report.quarantined
    assert report.counts["unlabeled"] == 2  # both series of the mixed folder
    shapes = sorted(r["shape"] for r in _rows(report.manifest))
    assert shapes == ["10x12x6", "10x12x8"]
    # one PatientID: both series share one salted group id, the raw ID is written nowhere
    items = json.loads(report.datalist.read_text())["unlabeled"]
    assert len({it["group_id"] for it in items}) == 1 and items[0]["group_id"].startswith("g")
    text = "".join(p.read_text() for p in (report.datalist, report.manifest, report.quarantine)) + caplog.text
    for value in PHI.values():
        assert value not in text
    assert report.exit_code == 3


def test_real_dicom_ingest_phi_scan(totalseg_dir: Path, ge_head_dir: Path, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture):
    """The real DICOM series convert (CT JPEG 2000) or quarantine (GE tilt) and leak no identifiers."""
    import logging

    import pydicom

    caplog.set_level(logging.DEBUG, logger="medssl")
    report = ingest([totalseg_dir / "example_ct_dicom", ge_head_dir / "dicom"], tmp_path / "out",
                    options=IngestOptions(salt="s"))
    assert report.counts["unlabeled"] == 1
    (q,) = report.quarantined
    assert "gantry_tilt" in q["reason"] and "18.5" in q["detail"]
    resampled = ingest([ge_head_dir / "dicom"], tmp_path / "out2",
                       options=IngestOptions(salt="s", tilt="resample", uneven="resample"))
    assert resampled.quarantined == [] and resampled.counts["unlabeled"] == 1
    identifiers = set()
    for f in list((totalseg_dir / "example_ct_dicom").iterdir())[:3] + list((ge_head_dir / "dicom").iterdir())[:3]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName",
                    "SeriesInstanceUID", "StudyInstanceUID"):
            value = str(ds.get(tag, "") or "")
            if len(value) >= 4 and value.upper() not in {"REMOVED", "ANONYMOUS"}:
                identifiers.add(value)
    assert identifiers  # the scan below must look for something
    for out in (report.out, resampled.out):
        text = "".join(p.read_text() for p in (out / "datalist.json", out / "manifest.csv", out / "quarantine.csv"))
        text += caplog.text
        for value in identifiers:
            assert value not in text, value
