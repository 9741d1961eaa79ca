from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.data.discover import discover, name_key
from medssl.errors import MedsslError


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


@pytest.mark.parametrize(
    ("name", "key"),
    [("case_01.nii.gz", "case_01"), ("case_01_seg.nii.gz", "case_01"), ("Case_01_label.nii", "case_01"),
     # nnU-Net channel suffixes are a folder-level decision (AMOS amos_0001 is a case): see test_layouts.py
     ("brats_0001_0000.nii.gz", "brats_0001_0000"), ("liver-mask.nii.gz", "liver"), ("x_gt.nii.gz", "x"),
     ("segmentation-12.nii", "12"), ("img0001.nii.gz", "0001"), ("imaging.nii.gz", ""),
     ("BraTS2021_00000_t1ce.nii.gz", "brats2021_00000")],
)
def test_name_key(name: str, key: str) -> None:
    assert name_key(Path(name)) == key


def test_pairs_images_and_labels_by_folder_and_suffix(tmp_path: Path) -> None:
    _touch(tmp_path / "imagesTr" / "a.nii.gz")
    _touch(tmp_path / "labelsTr" / "a.nii.gz")
    _touch(tmp_path / "imagesTr" / "b.nii.gz")  # no label -> unlabeled
    _touch(tmp_path / "flat" / "c.nii.gz")
    _touch(tmp_path / "flat" / "c_seg.nii.gz")
    _touch(tmp_path / "orphans" / "labels" / "zzz.nii.gz")
    _touch(tmp_path / "dicom" / "IM0001")  # no extension: DICOM candidate
    _touch(tmp_path / "dicom" / "notes.txt")  # ignored
    _touch(tmp_path / "mnist.npz")
    found = discover([tmp_path])
    by_name = {c.image.name: c for c in found.nifti}
    assert set(by_name) == {"a.nii.gz", "b.nii.gz", "c.nii.gz"}
    assert by_name["a.nii.gz"].label is not None and by_name["a.nii.gz"].label.parent.name == "labelsTr"
    assert by_name["a.nii.gz"].section == "training"
    assert by_name["b.nii.gz"].label is None and by_name["b.nii.gz"].section == "unlabeled"
    assert by_name["c.nii.gz"].label is not None and by_name["c.nii.gz"].label.name == "c_seg.nii.gz"
    assert [p.name for p in found.orphan_labels] == ["zzz.nii.gz"]
    assert [p.name for p in found.dicom_candidates] == ["IM0001"]
    assert [p.name for p in found.npz] == ["mnist.npz"]


def test_closest_label_wins_when_names_repeat(tmp_path: Path) -> None:
    for site in ("siteA", "siteB"):
        _touch(tmp_path / site / "images" / "001.nii.gz")
        _touch(tmp_path / site / "labels" / "001.nii.gz")
    found = discover([tmp_path])
    assert len(found.nifti) == 2
    for case in found.nifti:
        assert case.label is not None
        assert case.label.parent.parent == case.image.parent.parent
    assert len({c.key for c in found.nifti}) == 2


def test_explicit_labels_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "p1.nii.gz")
    _touch(tmp_path / "seg" / "p1_seg.nii.gz")
    found = discover([tmp_path / "img"], labels=[tmp_path / "seg"])
    assert found.nifti[0].label is not None and found.nifti[0].label.name == "p1_seg.nii.gz"


def test_msd_dataset_json(tmp_path: Path) -> None:
    _touch(tmp_path / "imagesTr" / "h1.nii.gz")
    _touch(tmp_path / "labelsTr" / "h1.nii.gz")
    _touch(tmp_path / "imagesTs" / "h2.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"},
        "training": [{"image": "./imagesTr/h1.nii.gz", "label": "./labelsTr/h1.nii.gz"}],
        "test": ["./imagesTs/h2.nii.gz"]}))
    found = discover([tmp_path])
    sections = {c.image.name: (c.section, c.modality) for c in found.nifti}
    assert sections == {"h1.nii.gz": ("training", "MRI"), "h2.nii.gz": ("unlabeled", "MRI")}


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="no such file"):
        discover([tmp_path / "nope"])


def test_bad_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MedsslError, match="dataset.json"):
        discover([tmp_path])
