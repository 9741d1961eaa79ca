"""Label-fraction splits: nesting, disjointness, stratification, determinism, errors, real datalists."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from medssl.data.medmnist import convert_medmnist
from medssl.data.phi import case_id
from medssl.data.splits import fraction_key, load_splits, make_splits, split_datalist, write_splits
from medssl.errors import MedsslError

FRACTIONS = [1, 5, 10, 25, 50, 100]


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _items(n: int, class_weights: list[float] | None, seed: int, n_unlabeled: int = 0) -> list[dict]:
    """``n`` labelled items (classification when ``class_weights`` else segmentation) + unlabelled ones."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        it = {"image": f"img{i}.nii.gz", "case_id": case_id(f"case{i}", f"salt{seed}")}
        if class_weights:
            it["class"] = rng.choices(range(len(class_weights)), class_weights)[0]
        else:
            it["label"] = f"lab{i}.nii.gz"
        items.append(it)
    items += [{"image": f"u{i}.nii.gz", "case_id": case_id(f"unl{i}", f"salt{seed}")} for i in range(n_unlabeled)]
    return items


def _check_invariants(items: list[dict], sp: dict, seeds: list[int]) -> None:
    all_ids = {it["case_id"] for it in items}
    labelled = {it["case_id"] for it in items if "class" in it or "label" in it}
    klass = {it["case_id"]: it.get("class") for it in items}
    test = set(sp["test"])
    assert test <= labelled and len(test) == len(sp["test"])
    assert sp["version"] == 2 and list(sp["seeds"]) == [str(s) for s in seeds]
    for s in map(str, seeds):
        val = set(sp["seeds"][s]["validation"])
        assert not val & test
        previous: set[str] = set()
        fr = sp["seeds"][s]["fractions"]
        assert list(fr) == [fraction_key(f) for f in sorted(FRACTIONS)]
        for key in fr:
            cur = set(fr[key])
            assert previous <= cur, f"seed {s}: fraction {key} does not contain the previous one"
            assert not cur & (val | test)
            classes_here = Counter(klass[c] for c in cur)
            assert set(classes_here) == {klass[c] for c in labelled - test - val}  # every class present
            previous = cur
        assert previous == labelled - test - val  # 100 % = every labelled training case of the seed
        assert set(sp["unlabeled"][s]) == all_ids - test - val
        assert sp["counts"]["seeds"][s]["fractions"] == {k: len(v) for k, v in fr.items()}
    vals = set().union(*(sp["seeds"][str(s)]["validation"] for s in seeds))
    assert set(sp["pretrain_pool"]) == all_ids - test - vals  # study-wide: outside EVERY seed's validation


@pytest.mark.parametrize("class_weights", [None, [0.5, 0.5], [0.8, 0.2], [0.6, 0.25, 0.1, 0.05]])
def test_invariants_over_many_random_datalists(class_weights):
    rng = random.Random(42)
    for trial in range(12):
        items = _items(rng.randint(30, 300), class_weights, seed=trial, n_unlabeled=rng.randint(0, 20))
        seeds = [0, 1, 2]
        sp = make_splits(items, fractions=FRACTIONS, seeds=seeds)
        _check_invariants(items, sp, seeds)
        assert sp["params"]["stratified"] is (class_weights is not None)
        # the test set does not depend on which seeds are asked for
        assert make_splits(items, fractions=[50], seeds=[7])["test"] == sp["test"]


def test_stratified_proportions():
    items = _items(1000, [0.8, 0.2], seed=3)
    n = Counter(it["class"] for it in items)
    sp = make_splits(items, fractions=FRACTIONS, seeds=[0])
    klass = {it["case_id"]: it["class"] for it in items}
    test = Counter(klass[c] for c in sp["test"])
    assert test == {k: _half_up(0.2 * n[k]) for k in n}
    val = Counter(klass[c] for c in sp["seeds"]["0"]["validation"])
    assert val == {k: _half_up(0.1 * n[k]) for k in n}
    train = {k: n[k] - test[k] - val[k] for k in n}
    for f in FRACTIONS:
        got = Counter(klass[c] for c in sp["seeds"]["0"]["fractions"][fraction_key(f)])
        assert got == {k: max(1, _half_up(f / 100 * train[k])) for k in n}
        share = got[1] / sum(got.values())
        assert abs(share - train[1] / sum(train.values())) < (0.15 if f == 1 else 0.02)


def test_one_case_per_class_at_one_percent():
    items = _items(100, [0.9, 0.1], seed=1)
    assert Counter(it["class"] for it in items)[1] >= 2
    for seed in range(5):
        sp = make_splits(items, fractions=[1], seeds=[seed])
        one = sp["seeds"][str(seed)]["fractions"]["1"]
        klass = {it["case_id"]: it["class"] for it in items}
        assert sorted(klass[c] for c in one) == [0, 1]


def test_deterministic_and_independent_of_input_order(tmp_path: Path):
    items = _items(200, [0.7, 0.3], seed=5, n_unlabeled=10)
    a = make_splits(items, fractions=FRACTIONS, seeds=[0, 1, 2])
    b = make_splits(list(reversed(items)), fractions=[100, 50, 25, 10, 5, 1, 5], seeds=[0, 1, 2])
    shuffled = items[:]
    random.Random(9).shuffle(shuffled)
    c = make_splits(shuffled, fractions=FRACTIONS, seeds=[0, 1, 2])
    assert a == b == c
    assert load_splits(write_splits(a, tmp_path / "s" / "splits.json")) == a
    # different seeds give different validation sets and subsets
    assert a["seeds"]["0"]["validation"] != a["seeds"]["1"]["validation"]
    assert a["seeds"]["0"]["fractions"]["10"] != a["seeds"]["1"]["fractions"]["10"]


def test_pinned_order_is_sha256_based():
    """Guards the cross-machine promise: this output may only change with a deliberate version bump."""
    items = [{"case_id": f"c{i:02d}", "label": "x"} for i in range(10)]
    sp = make_splits(items, fractions=[10, 50], seeds=[0], test_fraction=0.2, val_fraction=0.1)
    import hashlib

    def order(seed, role, ids):
        return sorted(ids, key=lambda c: hashlib.sha256(f"{seed}:{role}:{c}".encode()).hexdigest())

    ids = [it["case_id"] for it in items]
    test = order("test", "test", ids)[:2]
    val = order("0", "val", [c for c in ids if c not in test])[:1]
    train = order("0", "train", [c for c in ids if c not in test + val])
    assert sp["test"] == sorted(test) and sp["seeds"]["0"]["validation"] == sorted(val)
    assert sp["seeds"]["0"]["fractions"]["10"] == sorted(train[:1])
    assert sp["seeds"]["0"]["fractions"]["50"] == sorted(train[:4])


def test_impossible_class_raises_naming_fraction_and_class():
    items = _items(50, [1.0], seed=2) + [{"case_id": "crare", "class": 1}]
    with pytest.raises(MedsslError, match=r"fraction 5%.*class '1'"):
        make_splits(items, fractions=[5, 100], seeds=[0], fixed_test=["crare"])
    # drawn splits keep the lone case for training, so the same data splits fine
    sp = make_splits(items, fractions=[5, 100], seeds=[0])
    assert "crare" in sp["seeds"]["0"]["fractions"]["5"]


@pytest.mark.parametrize("kwargs,message", [
    ({"fractions": [0, 10]}, "(0, 100]"),
    ({"fractions": [10, 101]}, "(0, 100]"),
    ({"fractions": []}, "at least one fraction"),
    ({"fractions": ["ten"]}, "percent"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"test_fraction": 0.6, "val_fraction": 0.5}, "sum to < 1"),
    ({"test_fraction": -0.1}, "test_fraction"),
    ({"fixed_test": ["nope"]}, "unknown case ids"),
])
def test_argument_errors(kwargs, message):
    args = {"fractions": [10], "seeds": [0]} | kwargs
    with pytest.raises(MedsslError) as ei:
        make_splits(_items(40, [0.5, 0.5], seed=0), **args)
    assert message in str(ei.value)


def test_datalist_errors():
    items = _items(10, None, seed=0)
    with pytest.raises(MedsslError, match="duplicate case ids"):
        make_splits(items + [dict(items[0])], fractions=[10], seeds=[0])
    with pytest.raises(MedsslError, match="no case_id"):
        make_splits(items + [{"image": "x.nii.gz"}], fractions=[10], seeds=[0])
    with pytest.raises(MedsslError, match="no labelled items"):
        make_splits([{"case_id": "a", "image": "a"}], fractions=[10], seeds=[0])
    with pytest.raises(MedsslError, match="lack 'class'"):
        make_splits(_items(10, [1.0], seed=1) + items, fractions=[10], seeds=[0])
    with pytest.raises(MedsslError, match="share"):
        make_splits(items, fractions=[10], seeds=[0], fixed_test=[items[0]["case_id"]],
                    fixed_val=[items[0]["case_id"]])


def test_fixed_sets_are_used_for_every_seed():
    items = _items(60, [0.5, 0.5], seed=4)
    ids = [it["case_id"] for it in items]
    sp = make_splits(items, fractions=FRACTIONS, seeds=[0, 1], fixed_test=ids[:10], fixed_val=ids[10:16])
    assert sp["test"] == sorted(ids[:10])
    assert sp["seeds"]["0"]["validation"] == sp["seeds"]["1"]["validation"] == sorted(ids[10:16])
    assert sp["seeds"]["0"]["fractions"]["100"] == sorted(ids[16:])
    assert sp["params"]["fixed_test"] and sp["params"]["fixed_val"]
    _check_invariants(items, sp, [0, 1])


def test_split_datalist_official_sections_and_label_less_test(tmp_path: Path):
    items = _items(80, [0.5, 0.5], seed=6)
    dl = {"training": items[:60], "validation": items[60:68], "test": items[68:], "unlabeled": [
        {"image": "u.nii.gz", "case_id": "cunl"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    path, sp = split_datalist(tmp_path / "datalist.json", fractions=[10, 100], seeds=[0, 1])
    assert path == tmp_path / "splits.json" and load_splits(path) == sp
    assert sp["test"] == sorted(it["case_id"] for it in items[68:])
    assert sp["seeds"]["1"]["validation"] == sorted(it["case_id"] for it in items[60:68])
    assert set(sp["unlabeled"]["0"]) == {it["case_id"] for it in items[:60]} | {"cunl"}
    _, drawn = split_datalist(tmp_path / "datalist.json", fractions=[10], seeds=[0], use_official=False,
                              out=tmp_path / "x" / "drawn.json")
    assert drawn["test"] != sp["test"] and len(drawn["test"]) == 16
    # MSD-style: the test section holds images without labels -> pooled, test drawn from labelled cases
    msd = {"training": items[:60], "test": [{"image": "t.nii.gz", "case_id": "ctest"}]}
    (tmp_path / "msd.json").write_text(json.dumps(msd))
    _, sp2 = split_datalist(tmp_path / "msd.json", fractions=[10], seeds=[0])
    assert "ctest" not in sp2["test"] and "ctest" in sp2["unlabeled"]["0"] and len(sp2["test"]) == 12


def test_load_splits_rejects_other_files(tmp_path: Path):
    (tmp_path / "a.json").write_text(json.dumps({"version": 3, "test": []}))
    with pytest.raises(MedsslError, match="version 1 or 2"):
        load_splits(tmp_path / "a.json")
    (tmp_path / "v2.json").write_text(json.dumps({"version": 2, "test": [], "seeds": {}, "unlabeled": {}}))
    with pytest.raises(MedsslError, match="lacks 'pretrain_pool'"):
        load_splits(tmp_path / "v2.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(MedsslError, match="cannot read"):
        load_splits(tmp_path / "b.json")
    with pytest.raises(MedsslError, match="cannot read datalist"):
        split_datalist(tmp_path / "missing.json", fractions=[10], seeds=[0])


# labelled cases → (test, validation, cases per fraction): round half up of 20 % / 10 % of n, each fraction
# max(1, round(f % of the rest)); 200 = the shared copy, 40 = the shipped sample (examples/data/hippocampus)
REAL_SPLIT_SIZES = {
    200: (40, 20, {"1": 1, "5": 7, "10": 14, "25": 35, "50": 70, "100": 140}),  # 140 = 200 - 40 - 20
    40: (8, 4, {"1": 1, "5": 1, "10": 3, "25": 7, "50": 14, "100": 28}),  # 28 = 40 - 8 - 4
}


def test_real_hippocampus_200_cases(hippocampus_dir: Path, hippocampus_cases: int):
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))
    items = [{"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name),
              "case_id": case_id(p.name, "s")} for p in images]
    assert len(items) == hippocampus_cases
    if len(items) not in REAL_SPLIT_SIZES:
        pytest.skip(f"no expected split sizes for {len(items)} hippocampus cases (known: 200 shared, 40 sample)")
    n_test, n_val, sizes = REAL_SPLIT_SIZES[len(items)]
    sp = make_splits(items, fractions=FRACTIONS, seeds=[0, 1, 2])
    _check_invariants(items, sp, [0, 1, 2])
    assert len(sp["test"]) == n_test and sp["params"]["stratified"] is False
    for s in ("0", "1", "2"):
        assert len(sp["seeds"][s]["validation"]) == n_val
        assert {k: len(v) for k, v in sp["seeds"][s]["fractions"].items()} == sizes
        assert len(sp["unlabeled"][s]) == sizes["100"] == len(items) - n_test - n_val


def test_real_medmnist_1584_items(medmnist_dir: Path, tmp_path: Path):
    items = convert_medmnist(medmnist_dir / "adrenalmnist3d.npz", tmp_path / "nii", salt="s")
    sections = {"training": [], "validation": [], "test": []}
    for it in items:
        sections[it["split"]].append({"image": it["image"], "class": it["class"], "case_id": it["case_id"]})
    (tmp_path / "datalist.json").write_text(json.dumps(sections))
    _, sp = split_datalist(tmp_path / "datalist.json", fractions=FRACTIONS, seeds=[0, 1, 2])
    flat = [it for sec in sections.values() for it in sec]
    _check_invariants(flat, sp, [0, 1, 2])
    assert sp["counts"]["classes"]["test"] == {"0": 229, "1": 69}
    klass = {it["case_id"]: it["class"] for it in flat}
    for s in ("0", "1", "2"):
        assert Counter(klass[c] for c in sp["seeds"][s]["validation"]) == {0: 76, 1: 22}
        fr = sp["seeds"][s]["fractions"]
        assert len(fr["100"]) == 1188
        for f in FRACTIONS:
            assert Counter(klass[c] for c in fr[fraction_key(f)]) == {
                0: max(1, _half_up(f / 100 * 929)), 1: max(1, _half_up(f / 100 * 259))}
        assert len(sp["unlabeled"][s]) == 1188
    assert sp["seeds"]["0"]["fractions"]["1"] != sp["seeds"]["1"]["fractions"]["1"]


@pytest.mark.parametrize("class_weights", [None, [0.7, 0.3]])
def test_extend_splits_adds_seeds_and_fractions_keeping_every_set(tmp_path: Path, class_weights):
    from medssl.data.splits import extend_splits

    items = _items(60, class_weights, seed=3, n_unlabeled=5)
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[10, 100], seeds=[0, 1], test_fraction=0.25, val_fraction=0.15)
    assert extend_splits(dl, path, fractions=[10], seeds=[1]) is False  # nothing missing: untouched
    assert json.loads(path.read_text()) == old
    assert extend_splits(dl, path, fractions=[5, 100], seeds=[0, 2]) is True
    new = load_splits(path)
    assert new["test"] == old["test"] and sorted(new["seeds"]) == ["0", "1", "2"]
    assert new["params"]["test_fraction"] == 0.25 and new["params"]["fractions"] == [5.0, 10.0, 100.0]
    for seed in ("0", "1"):
        assert new["seeds"][seed]["validation"] == old["seeds"][seed]["validation"]
        for k, ids in old["seeds"][seed]["fractions"].items():
            assert new["seeds"][seed]["fractions"][k] == ids
        assert set(new["seeds"][seed]["fractions"]["5"]) <= set(ids)  # still nested
    # the added seed is a reserve seed: its validation set comes from what seeds 0/1 hold out, so the pretraining
    # pool (an encoder may exist already) is unchanged; a fresh split naming seed 2 a reserve seed is the same file
    assert new["params"]["reserve_seeds"] == [2] and new["pretrain_pool"] == old["pretrain_pool"]
    assert set(new["seeds"]["2"]["validation"]) <= set(old["seeds"]["0"]["validation"]) | set(
        old["seeds"]["1"]["validation"])
    assert len(new["seeds"]["2"]["validation"]) == len(new["seeds"]["0"]["validation"])
    _, fresh = split_datalist(dl, fractions=[5, 10, 100], seeds=[0, 1, 2], test_fraction=0.25, val_fraction=0.15,
                              out=tmp_path / "fresh.json", reserve_seeds=[2])
    assert new == fresh
    # without keep_pool, extending == having asked for the seeds at the start (the pool shrinks)
    path.write_text(json.dumps(old))
    assert extend_splits(dl, path, fractions=[5, 100], seeds=[0, 2], keep_pool=False) is True
    _, plain = split_datalist(dl, fractions=[5, 10, 100], seeds=[0, 1, 2], test_fraction=0.25, val_fraction=0.15,
                              out=tmp_path / "plain.json")
    assert load_splits(path) == plain and plain["params"]["reserve_seeds"] == []


def test_extend_splits_refuses_to_change_existing_sets(tmp_path: Path):
    from medssl.data.splits import extend_splits

    items = _items(40, None, seed=4)
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[50, 100], seeds=[0])
    edited = json.loads(path.read_text())
    edited["seeds"]["0"]["fractions"]["50"] = edited["seeds"]["0"]["fractions"]["50"][:-1]  # hand-edited
    path.write_text(json.dumps(edited))
    with pytest.raises(MedsslError, match=r"splits\.json: cannot add seeds \[1\].*seed 0 fraction 50 %"):
        extend_splits(dl, path, fractions=[50], seeds=[0, 1])
    assert json.loads(path.read_text()) == edited and not list(tmp_path.glob("*.extending"))
    # the datalist changed since the split (a case removed): the test set would move → refused, file kept
    dl.write_text(json.dumps({"training": items[1:]}))
    path.write_text(json.dumps(old))
    with pytest.raises(MedsslError, match="datalist changed or the file was edited"):
        extend_splits(dl, path, fractions=[25], seeds=[0])
    assert json.loads(path.read_text()) == old
