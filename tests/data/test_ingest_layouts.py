"""Ingest of tiny real NIfTI volumes in dataset layouts: labels never become images, multi-channel items,
per-structure merge, label-like image warnings, group ids, re-runs and the CLI exit code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.ingest import IngestOptions, ingest

SHAPE = (10, 12, 8)


def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _img(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _lab(shape=SHAPE, value: int = 1) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 2:5, 2:5] = value
    return lab


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _ingest(src: Path, out: Path, **kw):
    report = ingest([src], out, options=IngestOptions(salt="s", **kw.pop("opts", {})), **kw)
    return report, json.loads(report.datalist.read_text())


def test_kits_lits_hospital_labels_are_paired_not_ingested_as_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _nii(src / "kits" / "case_00000" / "imaging.nii.gz", _img(0))
    _nii(src / "kits" / "case_00000" / "segmentation.nii.gz", _lab())
    _nii(src / "lits" / "volume-0.nii", _img(1))
    _nii(src / "lits" / "segmentation-0.nii", _lab())
    _nii(src / "hosp" / "p1" / "image.nii.gz", _img(2))
    _nii(src / "hosp" / "p1" / "mask.nii.gz", _lab())
    _nii(src / "hosp" / "p2" / "image.nii.gz", _img(3))
    report, dl = _ingest(src, tmp_path / "out")
    assert report.quarantined == [] and report.exit_code == 0
    pairs = {(tmp_path / "out" / it["image"]).resolve().relative_to(src.resolve()).as_posix():
             (tmp_path / "out" / it["label"]).resolve().relative_to(src.resolve()).as_posix()
             for it in dl["training"]}
    assert pairs == {"kits/case_00000/imaging.nii.gz": "kits/case_00000/segmentation.nii.gz",
                     "lits/volume-0.nii": "lits/segmentation-0.nii",
                     "hosp/p1/image.nii.gz": "hosp/p1/mask.nii.gz"}
    assert [Path(it["image"]).parent.name for it in dl["unlabeled"]] == ["p2"]  # no label map in the image pool
    assert all(it["group_id"].startswith("g") for s in ("training", "unlabeled") for it in dl[s])
    assert report.warnings == []


def _brats(src: Path, case: str, mods=("t1", "t1ce", "t2", "flair"), seg=True, affine=None) -> None:
    for i, m in enumerate(mods):
        _nii(src / case / f"{case}_{m}.nii.gz", _img(10 * i + len(case)), affine if m == "t2" else None)
    if seg:
        _nii(src / case / f"{case}_seg.nii.gz", _lab())


def test_brats_multichannel_items_load_with_monai(tmp_path: Path) -> None:
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    src = tmp_path / "brats"
    _brats(src, "BraTS2021_00000")
    _brats(src, "BraTS2021_00001", seg=False)
    _brats(src, "BraTS2021_00002", mods=("flair", "t1", "t2"))  # no t1ce
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _brats(src, "BraTS2021_00003", affine=shifted)  # t2 on another grid
    report, dl = _ingest(src, tmp_path / "out")
    (item,) = dl["training"]
    assert item["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert [Path(p).name for p in item["image"]] == [f"BraTS2021_00000_{m}.nii.gz" for m in item["channels"]]
    assert Path(item["label"]).name == "BraTS2021_00000_seg.nii.gz"
    assert len(dl["unlabeled"]) == 1 and len(dl["unlabeled"][0]["image"]) == 4
    q = {Path(r["path"]).name: r["reason"] for r in report.quarantined}
    assert q["BraTS2021_00002_t1.nii.gz"] == "missing_channel"
    assert q["BraTS2021_00002_seg.nii.gz"] == "image_quarantined"
    assert q["BraTS2021_00003_t2.nii.gz"] == "channel_grid_mismatch"
    assert report.exit_code == 3
    loaded = LoadImaged(["image", "label"], image_only=True)(
        {k: str(tmp_path / "out" / v) if isinstance(v, str) else [str(tmp_path / "out" / p) for p in v]
         for k, v in item.items() if k in ("image", "label")})
    loaded = EnsureChannelFirstd(["image", "label"])(loaded)
    assert tuple(loaded["image"].shape) == (4, *SHAPE) and tuple(loaded["label"].shape) == (1, *SHAPE)
    rows = {r["case_id"]: r for r in _rows(report.manifest)}
    assert len(rows) == 2  # one row per item
    row = rows[item["case_id"]]
    assert row["channels"] == "t1;t1ce;t2;flair" and len(row["image"].split(";")) == 4
    assert len(row["sha256"].split(";")) == 4 and len(row["p50"].split(";")) == 4


def test_multichannel_rerun_skips_and_keeps_everything(tmp_path: Path) -> None:
    src = tmp_path / "brats"
    _brats(src, "BraTS2021_00000")
    _brats(src, "BraTS2021_00001")
    out = tmp_path / "out"
    first, dl1 = _ingest(src, out)
    again, dl2 = _ingest(src, out)
    assert again.processed == 0 and again.reused == 2 and dl1 == dl2
    _nii(src / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz", _img(99))
    third, dl3 = _ingest(src, out)
    assert third.processed == 1 and len(dl3["training"]) == 2


def test_nnunet_v2_multichannel_with_dataset_json(tmp_path: Path) -> None:
    src = tmp_path / "Dataset005_Prostate"
    for case in ("prostate_00", "prostate_01"):
        for c in range(2):
            _nii(src / "imagesTr" / f"{case}_{c:04d}.nii.gz", _img(c))
        _nii(src / "labelsTr" / f"{case}.nii.gz", _lab())
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                  "labels": {"background": 0, "PZ": 1}, "numTraining": 2,
                                                  "file_ending": ".nii.gz"}))
    report, dl = _ingest(src, tmp_path / "out")
    assert report.quarantined == [] and len(dl["training"]) == 2
    assert all(it["channels"] == ["T2", "ADC"] and it["image"][0].endswith("_0000.nii.gz") for it in dl["training"])
    assert dl["labels"] == {"0": "background", "1": "PZ"}
    assert len({it["group_id"] for it in dl["training"]}) == 2


def test_msd_4d_multimodal_file_stays_one_file(tmp_path: Path) -> None:
    src = tmp_path / "Task05"
    _nii(src / "imagesTr" / "prostate_00.nii.gz", np.stack([_img(0), _img(1)], axis=-1))
    _nii(src / "labelsTr" / "prostate_00.nii.gz", _lab())
    _nii(src / "imagesTr" / "prostate_01.nii.gz", np.stack([_img(2)] * 3, axis=-1))
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T2", "1": "ADC"},
        "training": [{"image": "./imagesTr/prostate_00.nii.gz", "label": "./labelsTr/prostate_00.nii.gz"}],
        "test": ["./imagesTr/prostate_01.nii.gz"]}))
    report, dl = _ingest(src, tmp_path / "out")
    (item,) = dl["training"]
    assert isinstance(item["image"], str) and item["channels"] == ["T2", "ADC"]
    assert [r["reason"] for r in report.quarantined] == ["channel_count_mismatch"]


def _totalseg_case(src: Path, name: str, structures: dict[str, np.ndarray], shape=SHAPE) -> None:
    _nii(src / name / "ct.nii.gz", np.random.default_rng(1).integers(-1000, 1000, shape).astype(np.int16))
    for s, mask in structures.items():
        _nii(src / name / "segmentations" / f"{s}.nii.gz", mask.astype(np.uint8))


def test_totalsegmentator_masks_merge_with_one_class_table(tmp_path: Path) -> None:
    src = tmp_path / "totalseg"
    liver, spleen = _lab(), np.zeros(SHAPE, np.uint8)
    spleen[6:8, 6:8, 6:8] = 1
    _totalseg_case(src, "s0001", {"liver": liver, "spleen": spleen})
    _totalseg_case(src, "s0002", {"aorta": spleen, "liver": liver})
    _totalseg_case(src, "s0003", {"liver": liver, "spleen": liver})  # overlap
    _totalseg_case(src, "s0004", {"liver": np.zeros((10, 12, 9))})  # other grid
    report, dl = _ingest(src, tmp_path / "out")
    table = {"0": "background", "1": "aorta", "2": "liver", "3": "spleen"}
    assert dl["labels"] == table
    assert json.loads((tmp_path / "out" / "nifti" / "labels.json").read_text()) == table
    assert len(dl["training"]) == 2
    merged = {Path(it["image"]).parent.name: np.asarray(nib.load(tmp_path / "out" / it["label"]).dataobj)
              for it in dl["training"]}
    assert np.array_equal(merged["s0001"], liver * 2 + spleen * 3)
    assert np.array_equal(merged["s0002"], liver * 2 + spleen * 1)
    q = {(Path(r["path"]).parent.parent.name if "segmentations" in r["path"] else Path(r["path"]).parent.name,
          r["reason"]) for r in report.quarantined}
    assert ("s0003", "structure_overlap") in q and ("s0004", "structure_grid_mismatch") in q
    detail = next(r["detail"] for r in report.quarantined if r["reason"] == "structure_overlap")
    assert "liver" in detail and "spleen" in detail and "27 voxels" in detail
    assert not any("s0003" in it["image"] or "s0004" in it["image"] for s in ("training", "unlabeled")
                   for it in dl[s])


def test_real_totalsegmentator_example_split_and_merged_back(totalseg_dir: Path, tmp_path: Path) -> None:
    """The real example CT and its real multi-label map, split into per-structure masks (the TotalSegmentator
    output layout); merging gives the original map under the ingest's class table."""
    ct = nib.load(totalseg_dir / "example_ct_sm.nii.gz")
    seg = np.asarray(nib.load(totalseg_dir / "example_seg.nii.gz").dataobj)
    names = json.loads((totalseg_dir / "class_map.json").read_text())["total"]
    keep = {int(k): v for k, v in names.items() if v in ("spleen", "kidney_right", "kidney_left", "liver")}
    assert all((seg == k).any() for k in keep)
    case = tmp_path / "src" / "s0001"
    case.mkdir(parents=True)
    (case / "ct.nii.gz").write_bytes((totalseg_dir / "example_ct_sm.nii.gz").read_bytes())
    for k, name in keep.items():
        _nii(case / "segmentations" / f"{name}.nii.gz", (seg == k).astype(np.uint8), ct.affine)
    report, dl = _ingest(tmp_path / "src", tmp_path / "out")
    assert report.quarantined == [] and report.warnings == []
    (item,) = dl["training"]
    index = {name: int(i) for i, name in dl["labels"].items()}
    expected = np.zeros(seg.shape, np.uint8)
    for k, name in keep.items():
        expected[seg == k] = index[name]
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out" / item["label"]).dataobj), expected)


def test_label_like_image_is_ingested_with_a_warning(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _nii(src / "p1" / "scan.nii.gz", _lab(value=3))  # a label map under an image name
    _nii(src / "p2" / "scan.nii.gz", _img(0))
    report, dl = _ingest(src, tmp_path / "out")
    assert report.exit_code == 0 and len(dl["unlabeled"]) == 2
    (w,) = _rows(tmp_path / "out" / "warnings.csv")
    assert w["reason"] == "looks_like_label" and w["path"].endswith("p1/scan.nii.gz") and "0 3" in w["detail"]
    assert _rows(report.quarantine) == []


def test_cli_ingest_exit_code_3_and_group_by(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medssl.cli import app

    src = tmp_path / "src"
    _nii(src / "pat-01" / "a.nii.gz", _img(0))
    _nii(src / "pat-01" / "b.nii.gz", _img(1))
    _nii(src / "pat-01" / "b_seg.nii.gz", _lab())
    _nii(src / "pat-02" / "a.nii.gz", _img(2))
    _nii(src / "pat-02" / "a_seg.nii.gz", _lab())
    _nii(src / "pat-02" / "a_mask.nii.gz", _lab())
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out"), "--salt", "s",
                              "--group-by", r"regex:pat-(\d+)"])
    assert res.exit_code == 3, res.output
    assert "ambiguous_label" in res.output
    dl = json.loads((tmp_path / "out" / "datalist.json").read_text())
    items = dl["training"] + dl["unlabeled"]
    assert len(items) == 2 and len({it["group_id"] for it in items}) == 1  # both of pat-01
    bad = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o2"), "--group-by", "patient"])
    assert bad.exit_code == 1 and "group-by" in bad.output


@pytest.mark.parametrize("rule", ["case", "parent"])
def test_group_ids_shared_within_a_patient_folder(tmp_path: Path, rule: str) -> None:
    src = tmp_path / "acdc"
    for pid in ("patient001", "patient002"):
        for frame in ("01", "12"):
            _nii(src / pid / f"{pid}_frame{frame}.nii.gz", _img(int(frame)))
            _nii(src / pid / f"{pid}_frame{frame}_gt.nii.gz", _lab())
    report, dl = _ingest(src, tmp_path / "out", opts={"group_by": rule})
    by_group: dict[str, set[str]] = {}
    for it in dl["training"]:
        by_group.setdefault(it["group_id"], set()).add(Path(it["image"]).parent.name)
    assert sorted(map(sorted, by_group.values())) == [["patient001"], ["patient002"]]
    assert len(dl["training"]) == 4
    rows = _rows(report.manifest)
    assert {r["group_id"] for r in rows} == set(by_group)


def test_dicom_patient_key_falls_back_from_placeholder_ids() -> None:
    from pydicom import Dataset

    from medssl.data.dicom_header import patient_key

    ds = Dataset()
    ds.PatientID, ds.StudyInstanceUID = "P123", "1.2.3"
    assert patient_key(ds) == "patient:P123"
    ds.PatientID = "ANONYMOUS"  # anonymised exports: one placeholder for everybody must not merge patients
    assert patient_key(ds) == "study:1.2.3"
    del ds.StudyInstanceUID
    assert patient_key(ds) == ""
