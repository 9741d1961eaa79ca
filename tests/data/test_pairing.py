"""Exact image → label pairs (or quarantine reasons) for the folder layouts of public datasets and hospitals.

Discovery reads names only (and ``dataset.json``), so the files here are one-byte placeholders; the ingest
of real tiny volumes in these layouts is in ``test_ingest_layouts.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.data.discover import discover
from medssl.data.layouts import nnunet_channels, parse_name
from medssl.errors import MedsslError


def _layout(root: Path, files: list[str]) -> Path:
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


def _result(root: Path, **kwargs) -> tuple[dict, dict]:
    """``({(image, ...): label | None}, {path: reason})`` relative to ``root``."""
    found = discover([root], **kwargs)
    rel = lambda p: Path(p).resolve().relative_to(root.resolve()).as_posix()  # noqa: E731
    pairs = {tuple(rel(i) for i in c.images): rel(c.label) if c.label else None for c in found.nifti}
    return pairs, {rel(p): reason for p, reason, _ in found.quarantine}


def test_kits19_case_folders(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz",
                              "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz",
                              "case_00210/imaging.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("case_00000/imaging.nii.gz",): "case_00000/segmentation.nii.gz",
                     ("case_00001/imaging.nii.gz",): "case_00001/segmentation.nii.gz",
                     ("case_00210/imaging.nii.gz",): None}
    assert q == {}


def test_lits_volume_segmentation_numbers(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["volume-0.nii", "segmentation-0.nii", "volume-1.nii", "segmentation-1.nii",
                              "volume-10.nii", "segmentation-11.nii"])
    pairs, q = _result(root)
    assert pairs == {("volume-0.nii",): "segmentation-0.nii", ("volume-1.nii",): "segmentation-1.nii",
                     ("volume-10.nii",): None}
    assert q == {"segmentation-11.nii": "orphan_label"}


def test_hospital_patient_image_mask(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["p01/image.nii.gz", "p01/mask.nii.gz", "p02/image.nii.gz", "p02/label.nii.gz",
                              "p03/image.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("p01/image.nii.gz",): "p01/mask.nii.gz", ("p02/image.nii.gz",): "p02/label.nii.gz",
                     ("p03/image.nii.gz",): None}
    assert q == {}


def test_label_of_another_patient_is_never_reused(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["p1/img.nii.gz", "p1/img_seg.nii.gz", "p2/img.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("p1/img.nii.gz",): "p1/img_seg.nii.gz", ("p2/img.nii.gz",): None}
    assert q == {}


def test_acdc_frames_and_gt(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["patient001/patient001_frame01.nii.gz", "patient001/patient001_frame01_gt.nii.gz",
                              "patient001/patient001_frame12.nii.gz", "patient001/patient001_frame12_gt.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {
        ("patient001/patient001_frame01.nii.gz",): "patient001/patient001_frame01_gt.nii.gz",
        ("patient001/patient001_frame12.nii.gz",): "patient001/patient001_frame12_gt.nii.gz"}
    found = discover([root])
    assert len({c.group for c in found.nifti}) == 1  # both frames of one patient: one group


def test_msd_dataset_json_and_reused_label(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["imagesTr/la_003.nii.gz", "labelsTr/la_003.nii.gz", "imagesTr/la_004.nii.gz",
                              "imagesTr/la_005.nii.gz", "labelsTr/la_005.nii.gz", "imagesTs/la_001.nii.gz"])
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"},
                     {"image": "./imagesTr/la_004.nii.gz", "label": "./labelsTr/la_005.nii.gz"},
                     {"image": "./imagesTr/la_005.nii.gz", "label": "./labelsTr/la_005.nii.gz"}],
        "test": ["./imagesTs/la_001.nii.gz"]}))
    pairs, q = _result(root)
    assert pairs == {("imagesTr/la_003.nii.gz",): "labelsTr/la_003.nii.gz", ("imagesTs/la_001.nii.gz",): None}
    assert q == {"imagesTr/la_004.nii.gz": "ambiguous_label", "imagesTr/la_005.nii.gz": "ambiguous_label",
                 "labelsTr/la_005.nii.gz": "ambiguous_label"}
    assert discover([root]).label_names == {"0": "background", "1": "left atrium"}


def test_nnunet_raw_multichannel_without_dataset_json(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["imagesTr/prostate_00_0000.nii.gz", "imagesTr/prostate_00_0001.nii.gz",
                              "labelsTr/prostate_00.nii.gz",
                              "imagesTr/prostate_01_0000.nii.gz", "imagesTr/prostate_01_0001.nii.gz",
                              "labelsTr/prostate_01.nii.gz",
                              "imagesTs/prostate_03_0000.nii.gz", "imagesTs/prostate_03_0001.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {
        ("imagesTr/prostate_00_0000.nii.gz", "imagesTr/prostate_00_0001.nii.gz"): "labelsTr/prostate_00.nii.gz",
        ("imagesTr/prostate_01_0000.nii.gz", "imagesTr/prostate_01_0001.nii.gz"): "labelsTr/prostate_01.nii.gz",
        ("imagesTs/prostate_03_0000.nii.gz", "imagesTs/prostate_03_0001.nii.gz"): None}
    assert q == {}
    assert {tuple(c.channels or []) for c in discover([root]).nifti} == {("0000", "0001")}


def test_nnunet_v2_dataset_json_names_channels(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["imagesTr/case_000_0000.nii.gz", "imagesTr/case_000_0001.nii.gz",
                              "labelsTr/case_000.nii.gz"])
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    found = discover([root])
    (case,) = found.nifti
    assert [p.name for p in case.images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert case.channels == ["T2", "ADC"] and case.label is not None and case.label.name == "case_000.nii.gz"
    assert found.label_names == {"0": "background", "1": "PZ", "2": "TZ"}


def test_nnunet_v1_dataset_json_lists_case_without_channel_suffix(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["imagesTr/case_000_0000.nii.gz", "imagesTr/case_000_0001.nii.gz",
                              "labelsTr/case_000.nii.gz"])
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T2", "1": "ADC"},
        "training": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}]}))
    (case,) = discover([root]).nifti
    assert [p.name for p in case.images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert case.channels == ["T2", "ADC"] and case.n_channels == 1


def test_amos_numbers_are_cases_not_channels(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz",
                              "imagesTr/amos_0004.nii.gz", "labelsTr/amos_0004.nii.gz", "imagesTs/amos_0008.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("imagesTr/amos_0001.nii.gz",): "labelsTr/amos_0001.nii.gz",
                     ("imagesTr/amos_0004.nii.gz",): "labelsTr/amos_0004.nii.gz",
                     ("imagesTs/amos_0008.nii.gz",): None}
    assert q == {}


def test_btcv_img_label_numbers(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["img/img0001.nii.gz", "label/label0001.nii.gz", "img/img0002.nii.gz",
                              "label/label0002.nii.gz", "img/img0003.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("img/img0001.nii.gz",): "label/label0001.nii.gz",
                     ("img/img0002.nii.gz",): "label/label0002.nii.gz", ("img/img0003.nii.gz",): None}
    assert q == {}


def test_brats_complete_and_missing_channel(tmp_path: Path) -> None:
    full = [f"BraTS2021_00000/BraTS2021_00000_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    partial = [f"BraTS2021_00001/BraTS2021_00001_{m}.nii.gz" for m in ("flair", "seg", "t1", "t2")]
    root = _layout(tmp_path, full + partial)
    pairs, q = _result(root)
    assert pairs == {tuple(f"BraTS2021_00000/BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")):
                     "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"}
    assert q == {f"BraTS2021_00001/BraTS2021_00001_{m}.nii.gz": "missing_channel" for m in ("flair", "t1", "t2")} | {
        "BraTS2021_00001/BraTS2021_00001_seg.nii.gz": "image_quarantined"}
    found = discover([root])
    assert found.nifti[0].channels == ["t1", "t1ce", "t2", "flair"]
    detail = next(d for p, r, d in found.quarantine if r == "missing_channel")
    assert "t1ce" in detail and "BraTS2021_00001" in detail


def test_brats_flat_folder_groups_by_case_key(tmp_path: Path) -> None:
    files = [f"BraTS2021_0000{i}_{m}.nii.gz" for i in (0, 1) for m in ("t1", "t1ce", "t2", "flair", "seg")]
    root = _layout(tmp_path, files)
    found = discover([root])
    assert len(found.nifti) == 2 and found.quarantine == []
    assert len({c.group for c in found.nifti}) == 2  # flat folder: the group is the case key, not the folder


def test_totalsegmentator_structure_folders(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["s0001/ct.nii.gz", "s0001/segmentations/liver.nii.gz",
                              "s0001/segmentations/spleen.nii.gz", "s0002/ct.nii.gz",
                              "s0002/segmentations/aorta.nii.gz"])
    found = discover([root])
    assert found.quarantine == []
    got = {c.images[0].parent.name: (c.label, c.section, sorted(c.structures or {})) for c in found.nifti}
    assert got == {"s0001": (None, "training", ["liver", "spleen"]), "s0002": (None, "training", ["aorta"])}


def test_flat_folder_with_suffixes(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "b_mask.nii.gz", "c.nii.gz",
                              "c-label.nii", "d.nii.gz", "e_mask.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("a.nii.gz",): "a_seg.nii.gz", ("b.nii.gz",): "b_mask.nii.gz", ("c.nii.gz",): "c-label.nii",
                     ("d.nii.gz",): None}
    assert q == {"e_mask.nii.gz": "orphan_label"}


def test_two_candidate_labels_are_ambiguous(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["p/scan.nii.gz", "p/scan_seg.nii.gz", "p/scan_mask.nii.gz", "q/scan.nii.gz",
                              "q/scan_seg.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("q/scan.nii.gz",): "q/scan_seg.nii.gz"}
    assert q == {"p/scan.nii.gz": "ambiguous_label", "p/scan_seg.nii.gz": "ambiguous_label",
                 "p/scan_mask.nii.gz": "ambiguous_label"}
    detail = next(d for p, _, d in discover([root]).quarantine if p.endswith("p/scan.nii.gz"))
    assert "scan_seg.nii.gz" in detail and "scan_mask.nii.gz" in detail


def test_one_label_folder_matching_two_images_is_ambiguous(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["images/x.nii.gz", "images_old/x.nii.gz", "labels/x.nii.gz", "images/y.nii.gz",
                              "labels/y.nii.gz"])
    pairs, q = _result(root)
    assert pairs == {("images/y.nii.gz",): "labels/y.nii.gz"}
    assert q == {"images/x.nii.gz": "ambiguous_label", "images_old/x.nii.gz": "ambiguous_label",
                 "labels/x.nii.gz": "ambiguous_label"}


def test_label_named_files_never_enter_the_image_pool(tmp_path: Path) -> None:
    root = _layout(tmp_path, ["segmentation.nii.gz", "masks/liver.nii.gz", "x/gt.nii.gz"])
    found = discover([root])
    assert found.nifti == []
    assert {Path(p).name for p, r, _ in found.quarantine if r == "orphan_label"} == {
        "segmentation.nii.gz", "liver.nii.gz", "gt.nii.gz"}


@pytest.mark.parametrize(("rule", "groups"), [
    ("case", {"site/p1/a.nii.gz": "p1", "site/p1/b.nii.gz": "p1", "site/p2/a.nii.gz": "p2"}),
    ("parent", {"site/p1/a.nii.gz": "p1", "site/p1/b.nii.gz": "p1", "site/p2/a.nii.gz": "p2"}),
    ("file", {"site/p1/a.nii.gz": "a", "site/p1/b.nii.gz": "b", "site/p2/a.nii.gz": "a"}),
    ("regex:site/(p\\d)", {"site/p1/a.nii.gz": "p1", "site/p1/b.nii.gz": "p1", "site/p2/a.nii.gz": "p2"}),
])
def test_group_by_rules(tmp_path: Path, rule: str, groups: dict[str, str]) -> None:
    root = _layout(tmp_path / "src", list(groups))
    found = discover([root], group_by=rule)
    by_file = {c.images[0].relative_to(root.resolve()).as_posix(): c.group for c in found.nifti}
    # files with the same expected group share one key, different ones do not
    for f, g in groups.items():
        for f2, g2 in groups.items():
            assert (by_file[f] == by_file[f2]) == (g == g2), (rule, f, f2)


def test_group_by_regex_without_match_is_quarantined(tmp_path: Path) -> None:
    root = _layout(tmp_path / "src", ["pat-01/a.nii.gz", "other/b.nii.gz"])
    found = discover([root], group_by=r"regex:pat-(\d+)")
    assert [c.images[0].name for c in found.nifti] == ["a.nii.gz"]
    assert [(Path(p).name, r) for p, r, _ in found.quarantine] == [("b.nii.gz", "no_group")]


def test_bad_group_by_is_a_clear_error() -> None:
    from medssl.data.pairing import parse_group_by

    with pytest.raises(MedsslError, match="regular expression"):
        parse_group_by("regex:(")
    with pytest.raises(MedsslError, match="expected case"):
        parse_group_by("patient")


def test_parse_name_and_channel_suffix_rules() -> None:
    assert parse_name("BraTS-GLI-00000-000-t2f.nii.gz").channel == "t2f"
    assert parse_name("label0001.nii.gz").label_word and parse_name("label0001.nii.gz").key == "0001"
    assert nnunet_channels(["amos_0001", "amos_0002"], set()) is None
    assert nnunet_channels(["c_0000", "c_0001", "d_0000"], set()) is None  # d lacks channel 0001
    assert nnunet_channels(["c_0000", "c_0001"], set()) == {"c_0000": ("c", "0000"), "c_0001": ("c", "0001")}
    assert nnunet_channels(["c_0000"], {"c_0000"}) is None  # a label carries the full stem: a case id
