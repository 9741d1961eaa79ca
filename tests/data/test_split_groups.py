"""Patient groups in splits: no group crosses test / validation / training, fractions hold whole groups, the
study-wide pretraining pool excludes every held-out patient; version-1 files and extend_splits."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest

from medssl.data.split_groups import group_of, group_strata, take_groups
from medssl.data.splits import extend_splits, load_splits, make_splits, split_datalist
from medssl.errors import MedsslError

FRACTIONS = [1, 5, 10, 25, 50, 100]


def _grouped_items(rng: random.Random, n_groups: int, n_classes: int | None) -> list[dict]:
    """Patients with 1–5 labelled scans (sometimes of different classes), some unlabelled scans of the same
    patients, and some patient-less unlabelled volumes (no group_id)."""
    items: list[dict] = []
    for g in range(n_groups):
        base = rng.randrange(n_classes) if n_classes else None
        for k in range(rng.choice([1, 1, 2, 3, 5])):
            it = {"image": f"g{g}_{k}.nii.gz", "case_id": f"g{g}c{k}", "group_id": f"p{g}"}
            if n_classes:
                it["class"] = base if rng.random() < 0.8 else rng.randrange(n_classes)
            else:
                it["label"] = f"g{g}_{k}_seg.nii.gz"
            items.append(it)
        if rng.random() < 0.3:
            items.append({"image": f"g{g}_u.nii.gz", "case_id": f"g{g}u", "group_id": f"p{g}"})
    items += [{"image": f"u{i}.nii.gz", "case_id": f"u{i}"} for i in range(rng.randint(0, 8))]
    return items


def _check_groups(items: list[dict], sp: dict, seeds: list[int]) -> None:
    gid = {it["case_id"]: group_of(it) for it in items}
    labelled = {it["case_id"] for it in items if "class" in it or "label" in it}
    groups_of = lambda ids: {gid[c] for c in ids}  # noqa: E731
    test = set(sp["test"])
    held = groups_of(test)
    assert {c for c in labelled if gid[c] in held} == test  # a test patient's labelled scans are all test
    for s in map(str, seeds):
        val = set(sp["seeds"][s]["validation"])
        fr = sp["seeds"][s]["fractions"]
        train = set(fr["100"])
        roles = {"test": groups_of(test), "validation": groups_of(val), "training": groups_of(train)}
        for a, b in (("test", "validation"), ("test", "training"), ("validation", "training")):
            assert not roles[a] & roles[b], f"seed {s}: a patient is in both {a} and {b}"
        assert test | val | train == labelled  # nobody dropped when nothing is fixed
        previous: set[str] = set()
        for key in sorted(fr, key=float):
            cur = set(fr[key])
            assert previous <= cur and {c for c in labelled if gid[c] in groups_of(cur)} == cur  # whole groups
            previous = cur
        seed_held = groups_of(test | val)
        assert set(sp["unlabeled"][s]) == {c for c in gid if gid[c] not in seed_held}
        held |= groups_of(val)
    pool = set(sp["pretrain_pool"])
    assert pool == {c for c in gid if gid[c] not in held}  # everyone else, unlabelled scans included
    assert not groups_of(pool) & held


@pytest.mark.parametrize("n_classes", [None, 2, 3])
def test_no_group_crosses_a_boundary_over_many_random_layouts(n_classes):
    rng = random.Random(1234)
    for _ in range(25):
        items = _grouped_items(rng, rng.randint(25, 90), n_classes)
        seeds = [0, 1, 2]
        try:
            sp = make_splits(items, fractions=FRACTIONS, seeds=seeds)
        except MedsslError as e:  # a rare class drawn only as a minority: the documented refusal
            assert "cannot hold a case" in str(e)
            continue
        _check_groups(items, sp, seeds)
        shuffled = items[:]
        rng.shuffle(shuffled)
        assert make_splits(shuffled, fractions=FRACTIONS, seeds=seeds) == sp  # deterministic


def test_sizes_are_cases_with_whole_groups_up_to_the_target():
    # 10 patients of 4 scans + 20 single-scan patients = 60 cases; test target round(0.2 * 60) = 12 cases
    items = [{"case_id": f"a{g}{k}", "group_id": f"A{g}", "label": "x"} for g in range(10) for k in range(4)]
    items += [{"case_id": f"b{g}", "label": "x"} for g in range(20)]
    sp = make_splits(items, fractions=[10, 100], seeds=[0], test_fraction=0.2, val_fraction=0.1)
    assert 12 <= len(sp["test"]) < 12 + 4 and 6 <= len(sp["seeds"]["0"]["validation"]) < 6 + 4
    n_train = len(sp["seeds"]["0"]["fractions"]["100"])
    assert math.floor(0.1 * n_train + 0.5) <= len(sp["seeds"]["0"]["fractions"]["10"]) < math.floor(
        0.1 * n_train + 0.5) + 4
    assert sp["counts"]["groups"] == 30 and sp["params"]["group_key"] == "group_id"


def test_take_groups_and_majority_class():
    size = {"a": 3, "b": 1, "c": 2}
    assert take_groups(["b", "a", "c"], size, 2) == ["b", "a"]
    assert take_groups(["b", "a", "c"], size, 1) == ["b"] and take_groups(["b", "a", "c"], size, 0) == []
    assert take_groups(["b", "a", "c"], size, 99) == ["b", "a", "c"]
    klass = {"x1": "1", "x2": "1", "x3": "0", "y1": "0", "y2": "1"}
    assert group_strata({"X": ["x1", "x2", "x3"], "Y": ["y1", "y2"]}, klass) == {"0": ["Y"], "1": ["X"]}


def test_unlabelled_scan_of_a_test_patient_leaves_the_pool():
    items = [{"case_id": f"c{i}", "group_id": f"p{i}", "label": "x"} for i in range(20)]
    items += [{"case_id": f"u{i}", "group_id": f"p{i}"} for i in range(20)]  # a follow-up scan per patient
    sp = make_splits(items, fractions=[100], seeds=[0, 1])
    held = set(sp["test"]) | set(sp["seeds"]["0"]["validation"]) | set(sp["seeds"]["1"]["validation"])
    assert {c.replace("c", "u") for c in held} & set(sp["pretrain_pool"]) == set()
    assert len(sp["pretrain_pool"]) == 2 * (20 - len(held)) == sp["counts"]["pretrain_pool"]


def test_fixed_sets_and_groups():
    items = [{"case_id": f"c{i}", "group_id": f"p{i // 2}", "label": "x"} for i in range(40)]
    with pytest.raises(MedsslError, match="share 1 patient groups"):
        make_splits(items, fractions=[100], seeds=[0], fixed_test=["c0"], fixed_val=["c1"])
    sp = make_splits(items, fractions=[100], seeds=[0], fixed_test=["c0", "c2", "c3"])
    assert "c1" not in sp["seeds"]["0"]["fractions"]["100"] + sp["seeds"]["0"]["validation"]  # p0 is held out
    assert "c1" not in sp["pretrain_pool"] and sp["test"] == ["c0", "c2", "c3"]


def _v1(sp: dict) -> dict:
    """What version 1 wrote: no pretrain_pool, no groups."""
    return {k: v for k, v in sp.items() if k != "pretrain_pool"} | {"version": 1}


def test_version_1_files_load_with_a_derived_study_pool(tmp_path: Path):
    items = [{"case_id": f"c{i:02d}", "label": "x"} for i in range(30)] + [{"case_id": "u0"}]
    sp = make_splits(items, fractions=[50, 100], seeds=[0, 1, 2])
    (tmp_path / "v1.json").write_text(json.dumps(_v1(sp)))
    loaded = load_splits(tmp_path / "v1.json")
    assert loaded["version"] == 1 and loaded["pretrain_pool"] == sp["pretrain_pool"]
    held = set(sp["test"]).union(*(s["validation"] for s in sp["seeds"].values()))
    assert "u0" in loaded["pretrain_pool"] and not held & set(loaded["pretrain_pool"])


def test_extend_splits_keeps_the_pool_with_reserve_seeds(tmp_path: Path):
    items = [{"case_id": f"c{i:02d}", "group_id": f"p{i // 3}", "label": "x"} for i in range(60)]
    items += [{"case_id": f"u{i}", "group_id": f"p{i}"} for i in range(20)]  # unlabelled follow-ups
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[50, 100], seeds=[0, 1])
    assert extend_splits(dl, path, fractions=[100], seeds=[2, 3]) is True
    new = load_splits(path)
    assert new["pretrain_pool"] == old["pretrain_pool"] and new["params"]["reserve_seeds"] == [2, 3]
    reserve = set(old["seeds"]["0"]["validation"]) | set(old["seeds"]["1"]["validation"])
    for s in ("2", "3"):
        assert new["seeds"][s]["validation"] and set(new["seeds"][s]["validation"]) <= reserve
        assert not set(new["seeds"][s]["validation"]) & set(new["pretrain_pool"])
    assert new["seeds"]["2"]["validation"] != new["seeds"]["3"]["validation"]  # each seed its own draw
    _check_groups(items, new, [0, 1, 2, 3])
    # extending again reproduces the reserve seeds' sets (they are recorded in params)
    assert extend_splits(dl, path, fractions=[50], seeds=[4]) is True
    again = load_splits(path)
    assert again["seeds"]["2"] == new["seeds"]["2"] and again["params"]["reserve_seeds"] == [2, 3, 4]
    with pytest.raises(MedsslError, match="reserve_seeds"):
        make_splits(items, fractions=[100], seeds=[0], reserve_seeds=[0])


def test_extend_splits_writes_the_smaller_pool_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    items = [{"case_id": f"c{i:02d}", "group_id": f"p{i // 3}", "label": "x"} for i in range(60)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[100], seeds=[0, 1])
    path.write_text(json.dumps(_v1(old)))  # a version-1 file extended → rewritten as version 2
    with caplog.at_level(logging.WARNING, logger="medssl.data.splits"):
        assert extend_splits(dl, path, fractions=[100], seeds=[2], keep_pool=False) is True
    new = load_splits(path)
    assert new["version"] == 2 and new["seeds"]["0"] == old["seeds"]["0"]
    lost = set(old["pretrain_pool"]) - set(new["pretrain_pool"])
    assert lost and lost <= set(new["seeds"]["2"]["validation"]) and set(new["pretrain_pool"]) < set(
        old["pretrain_pool"])
    assert "pretrain_pool lost" in caplog.text and "re-pretrain" in caplog.text
    _check_groups(items, new, [0, 1, 2])
