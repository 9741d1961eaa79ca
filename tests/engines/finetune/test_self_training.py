"""Self-training (``self_training``): the teacher's pseudo-labels of the seed's unlabeled volumes join the training
items, never from or about held-out cases; made once and reused (exact resume); refused mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.data.splits import split_datalist
from medssl.engines.finetune import Finetuner, run_finetune
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.identity import config_identity
from medssl.engines.finetune.pseudo import labelled_repeats, normalise_self_training, pool_ids
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.errors import ConfigMismatchError, MedsslError
from tests.engines.finetune._crash import crash_at_epoch

SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """:func:`synthetic_cases` in a module-wide folder."""
    return synthetic_cases(tmp_path_factory.mktemp("st"))


def synthetic_cases(folder: Path, unlabeled: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    """14 cases of 8×8×8 voxels (a bright cube = class 1 on a noisy background), 2 seeds, fractions 20 / 100;
    every case has a true label file (which a pseudo-labelled case must never use). ``unlabeled``: label-less
    images (case id → file bytes) in the datalist's ``unlabeled`` section. Returns (datalist, splits)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(14):
        img = rng.normal(0, 0.1, (8, 8, 8)).astype(np.float32)
        lab = np.zeros((8, 8, 8), np.uint8)
        o = i % 3
        img[o:o + 4, 2:6, 2:6] += 1.0
        lab[o:o + 4, 2:6, 2:6] = 1
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"case{i:02d}"})
    extra = []
    for case, raw in (unlabeled or {}).items():
        (folder / f"{case}.nii.gz").write_bytes(raw)
        extra.append({"image": f"{case}.nii.gz", "case_id": case})
    (folder / "datalist.json").write_text(json.dumps({"labels": {"0": "background", "1": "cube"}, "training": items,
                                                      "unlabeled": extra}))
    splits, _ = split_datalist(folder / "datalist.json", fractions=[20, 100], seeds=[0, 1], test_fraction=0.2,
                               val_fraction=0.2)
    return folder / "datalist.json", splits


def _cfg(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(datalist=str(data[0]), splits=str(data[1]), fraction=20, network="SegResNet", network_kwargs=SEG_NET,
                out_channels=2, roi_size=[8, 8, 8], normalisation="none", batch_size=2, num_samples=1, max_steps=3,
                sw_overlap=0.0, sw_batch_size=1, device="cpu", out_dir=str(out), experiment=None, lr=1e-2,
                augment={"flip_prob": 0.0})
    return FinetuneConfig(**(base | kw))


@pytest.fixture(scope="module")
def teacher(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed-0 teacher at 20 % (its best.pt)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    return run_finetune(_cfg(data, out, max_steps=6), progress=False).best_checkpoint


def test_spec_is_normalised_and_checked() -> None:
    assert normalise_self_training(None) is None and normalise_self_training({}) is None
    assert normalise_self_training("t.pt") == {"teacher": "t.pt", "pool": "seed", "labelled_share": 0.5, "tta": True}
    for bad, match in (({"teacher": "t.pt", "share": 0.5}, "unknown"), ({"pool": "seed"}, "teacher"),
                       ({"teacher": "t.pt", "pool": "all"}, "pool"), ({"teacher": "t.pt", "labelled_share": 1}, "share")):
        with pytest.raises(ValueError, match=match):
            normalise_self_training(bad)
    with pytest.raises(ValueError, match="segmentation"):
        FinetuneConfig(task="classification", network="ResNet", self_training="t.pt")
    base = FinetuneConfig()
    assert "self_training" not in config_identity(base)  # off: hash-neutral (older studies keep their hash)
    assert config_identity(base.replace(self_training="t.pt"))["self_training"]["teacher"] == "t.pt"


def test_labelled_repeats() -> None:
    assert labelled_repeats(7, 133, 0.5) == 19
    assert labelled_repeats(7, 133, 0.25) == 6
    assert labelled_repeats(20, 5, 0.5) == 1 and labelled_repeats(3, 0, 0.5) == 1


def test_student_trains_on_labelled_plus_pseudo_labels(data, teacher: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "student", self_training={"teacher": str(teacher), "tta": False})
    ft = Finetuner(cfg)
    sp = json.loads(Path(data[1]).read_text())
    labelled = [it["case_id"] for it in ft.items["training"]]
    held = {it["case_id"] for r in ("validation", "test") for it in ft.items[r]}
    pool = pool_ids(sp, 0, "seed", labelled)
    assert pool and not set(pool) & (held | set(labelled))
    assert [it["case_id"] for it in ft.pseudo.items] == [f"pseudo:{c}" for c in pool]
    folder = tmp_path / "student" / "pseudo_labels"
    for it in ft.pseudo.items:  # the teacher's labels on each volume's own grid, never the true label file
        assert Path(it["label"]).parent == folder
        lab = nib.load(it["label"])
        assert lab.shape == (8, 8, 8) and set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}
    r = labelled_repeats(len(labelled), len(pool), 0.5)
    assert len(ft.train_view) == r * len(labelled) + len(pool) and len(ft.train_ds) == len(labelled) + len(pool)
    st = ft.recipe["self_training"]
    assert st["cases"] == len(pool) and st["labelled_repeats"] == r and not st["reused"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["cases"] == pool and manifest["teacher_sha256"] == st["teacher_sha256"]
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.glob("*_seg.nii.gz")}
    again = Finetuner(cfg)  # a resumed run reuses the labels: not predicted again
    assert again.recipe["self_training"]["reused"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*_seg.nii.gz")} == stamp
    res = again.fit(progress=False)
    assert load_checkpoint(res.best_checkpoint)["recipe"]["self_training"]["cases"] == len(pool)
    with pytest.raises(MedsslError, match=r"other \['tta'\]"):  # never relabelled under a run
        Finetuner(cfg.replace(self_training={"teacher": str(teacher), "tta": True}))


def test_study_pool_excludes_every_seeds_validation(data, teacher: Path, tmp_path: Path) -> None:
    ft = Finetuner(_cfg(data, tmp_path / "s", self_training={"teacher": str(teacher), "pool": "study", "tta": False}))
    sp = json.loads(Path(data[1]).read_text())
    vals = {c for s in sp["seeds"].values() for c in s["validation"]}
    got = {it["case_id"].removeprefix("pseudo:") for it in ft.pseudo.items}
    assert got and not got & vals and got <= set(sp["pretrain_pool"])


def test_a_teacher_that_saw_held_out_cases_is_refused(data, tmp_path: Path) -> None:
    # seed 1's 100 % training set holds seed 0's validation cases (and its validation differs from seed 0's)
    other = run_finetune(_cfg(data, tmp_path / "t1", seed=1, fraction=100, max_steps=1), progress=False)
    with pytest.raises(MedsslError, match="validation case"):
        Finetuner(_cfg(data, tmp_path / "s", self_training=str(other.best_checkpoint)))
    # a teacher whose splits put this run's test cases into its training set
    sp = json.loads(Path(data[1]).read_text())
    moved = dict(sp, test=sp["test"][1:])
    moved["seeds"] = {k: dict(v, fractions={f: ids + [sp["test"][0]] for f, ids in v["fractions"].items()})
                      for k, v in sp["seeds"].items()}
    bad_splits = tmp_path / "leaky_splits.json"
    bad_splits.write_text(json.dumps(moved))
    leaky = run_finetune(_cfg(data, tmp_path / "t2", splits=str(bad_splits), max_steps=1), progress=False)
    with pytest.raises(MedsslError, match="test case"):
        Finetuner(_cfg(data, tmp_path / "s2", self_training=str(leaky.best_checkpoint)))


def test_a_pool_case_in_the_test_set_is_refused(data, teacher: Path, tmp_path: Path) -> None:
    sp = json.loads(Path(data[1]).read_text())
    sp["unlabeled"]["0"] = sorted(sp["unlabeled"]["0"] + [sp["test"][0]])
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps(sp))
    with pytest.raises(MedsslError, match="test set"):
        Finetuner(_cfg(data, tmp_path / "s", splits=str(bad), self_training=str(teacher)))


def test_a_teacher_of_other_classes_is_refused(data, teacher: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(teacher)
    ckpt["config"]["out_channels"] = 3
    three = tmp_path / "three.pt"
    torch.save(ckpt, three)
    with pytest.raises(MedsslError, match="3 classes, this run has out_channels=2"):
        Finetuner(_cfg(data, tmp_path / "s", self_training=str(three)))


def test_resume_is_exact_and_refuses_switching_self_training(data, teacher: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(self_training={"teacher": str(teacher), "tta": False}, max_steps=0, max_epochs=3, deterministic=True)
    straight = run_finetune(_cfg(data, tmp_path / "a", **kw), progress=False)
    cfg = _cfg(data, tmp_path / "b", **kw)
    last = crash_at_epoch(cfg, 2, monkeypatch)
    resumed = run_finetune(cfg, resume=last, progress=False)
    a, b = load_checkpoint(straight.best_checkpoint), load_checkpoint(resumed.best_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.test_metrics == straight.test_metrics
    with pytest.raises(ConfigMismatchError, match="self_training"):
        run_finetune(_cfg(data, tmp_path / "b", max_steps=0, max_epochs=3), resume=last, progress=False)


def test_an_unreadable_pool_volume_is_left_out_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = synthetic_cases(tmp_path / "d", unlabeled={"broken": b"not a nifti"})
    assert "broken" in json.loads(Path(data[1]).read_text())["unlabeled"]["0"]
    teacher = run_finetune(_cfg(data, tmp_path / "t", max_steps=1), progress=False).best_checkpoint
    ft = Finetuner(_cfg(data, tmp_path / "s", self_training={"teacher": str(teacher), "tta": False}))
    assert ft.pseudo.report["failed"] == ["broken"] and "pseudo:broken" not in {it["case_id"] for it in ft.pseudo.items}
    assert ft.pseudo.items and "left out" in caplog.text
    report = json.loads((tmp_path / "s" / "pseudo_labels" / "predict_report.json").read_text())
    assert report["failed"] == 1
