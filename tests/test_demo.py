from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from medssl.demo import HELD_BACK_CASE, default_sample_dir, predict_held_back, run_demo

HELD_BACK_FILE = f"{HELD_BACK_CASE}.nii.gz"


def _check_held_back(res: dict) -> None:
    """The held-back case is in no datalist section, so in no split, fraction or pretraining pool."""
    dl_path = res["hippocampus"].datalist
    dl = json.loads(dl_path.read_text())
    items = [it for sec in ("training", "validation", "test", "unlabeled") for it in dl.get(sec) or []]
    files = {Path(f).name for it in items for f in [it["image"], it.get("label")] if f}
    assert HELD_BACK_FILE not in files and len(files) == 39 + 20  # a label shares its image's file name
    ids = {it["case_id"] for it in items}
    splits = json.loads(Path(res["splits"]).read_text())
    used = set(splits["test"]) | set(splits["pretrain_pool"]) | set().union(*splits["unlabeled"].values())
    for s in splits["seeds"].values():
        used |= set(s["validation"]).union(*s["fractions"].values())
    assert used <= ids, "a split names a case outside the ingested datalist"
    assert HELD_BACK_CASE not in json.dumps(splits) and HELD_BACK_CASE not in dl_path.read_text()
    staged = json.loads((dl_path.parents[1] / "sample" / "hippocampus" / "dataset.json").read_text())
    assert all(HELD_BACK_FILE not in t["image"] for t in staged["training"]) and staged["numTraining"] == 39
    # the shipped sample itself is untouched (the demo predicts on the original file)
    assert (default_sample_dir() / "hippocampus" / "imagesTr" / HELD_BACK_FILE).is_file()


def _check_common(res: dict, console: Console) -> None:
    dl = json.loads(res["hippocampus"].datalist.read_text())
    assert len(dl["training"]) == 39 and len(dl["unlabeled"]) == 20
    _check_held_back(res)
    assert res["ct"].counts["unlabeled"] == 1
    splits = json.loads(Path(res["splits"]).read_text())
    assert set(splits["seeds"]) == {"0", "1"}
    assert "demo finished" in console.export_text(clear=False)
    pre = res["pretrain"]
    assert len(pre.loss_history) == 3 and pre.encoder_path.is_file() and pre.run_id


def _check_prediction(pred: dict, out: Path, console: Console) -> None:
    image = default_sample_dir() / "hippocampus" / "imagesTr" / HELD_BACK_FILE
    seg = out / "predict" / f"{HELD_BACK_CASE}_seg.nii.gz"
    assert pred["seg"] == seg and seg.is_file()
    src, got = nib.load(image), nib.load(seg)
    assert got.shape == src.shape and np.allclose(got.affine, src.affine, atol=1e-5)
    labels = np.asarray(got.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    assert sum(pred["voxels_per_class"].values()) == labels.size
    assert set(pred["dice"]) == {"dice_1", "dice_2", "dice_mean"}
    assert all(0.0 <= v <= 1.0 for v in pred["dice"].values())
    text = console.export_text(clear=False)
    assert "held-back" in text and f"written: {seg}" in text


def test_demo_sample_ships_with_license_and_runs(tmp_path: Path) -> None:
    """CI-sized: ingest (without the held-back case) + split + pretraining (the sweep: tests/engines/studies/test_sweep.py)."""
    readme = (default_sample_dir() / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Apache" in readme
    console = Console(record=True, width=120)
    res = run_demo(tmp_path / "demo", console=console, pretrain_steps=3, finetune_steps=0,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    _check_common(res, console)
    assert "sweep" not in res and "predict" not in res


def test_predict_held_back_scores_the_shipped_case(tmp_path: Path, hippocampus_dir: Path) -> None:
    """The demo's closing stage on a tiny real finetuned model: the input's grid, voxel counts, a Dice that
    equals a direct numpy Dice of the written file against the shipped label."""
    from tests.deploy._finetuned import finetune_seg

    _, run = finetune_seg(hippocampus_dir, tmp_path / "ft")
    console = Console(record=True, width=200)
    sample = default_sample_dir() / "hippocampus"
    label = sample / "labelsTr" / HELD_BACK_FILE
    pred = predict_held_back(run, sample / "imagesTr" / HELD_BACK_FILE, label, tmp_path / "predict",
                             console=console, title="held-back")
    _check_prediction(pred, tmp_path, console)
    p, g = np.asarray(nib.load(pred["seg"]).dataobj), np.asarray(nib.load(label).dataobj)
    for c in (1, 2):
        inter, total = np.sum((p == c) & (g == c)), np.sum(p == c) + np.sum(g == c)
        assert pred["dice"][f"dice_{c}"] == pytest.approx(2 * inter / total if total else 1.0, abs=1e-6)


@pytest.mark.slow
def test_demo_whole_story(tmp_path: Path) -> None:
    """What `make demo` runs, with tiny step counts: … → sweep (2 fractions × 2 inits) → compare → predict."""
    console = Console(record=True, width=200)
    res = run_demo(tmp_path / "demo", console=console, pretrain_steps=3, finetune_steps=2,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    _check_common(res, console)
    sweep, comparison = res["sweep"], res["compare"]
    assert [c.status for c in sweep.children] == ["FINISHED"] * 4, sweep.children
    assert {(r["fraction"], r["init"]) for r in comparison.records} == {(25, "scratch"), (25, "ssl"),
                                                                       (100, "scratch"), (100, "ssl")}
    assert comparison.png_path.is_file() and comparison.csv_path.is_file()
    assert comparison.efficiency.needed.keys() == {"scratch", "ssl"}  # scratch reaches its own 100 % mean
    assert comparison.efficiency.needed["scratch"] in (25.0, 100.0)
    assert "Labels needed (1 seed, demo-sized): test_dice_mean ≥" in console.export_text(clear=False)
    _check_prediction(res["predict"], tmp_path / "demo", console)
    ssl100 = next(c for c in sweep.children if c.init == "ssl" and c.fraction == 100)
    assert json.loads((tmp_path / "demo" / "predict" / "predict_report.json").read_text())["model"] == str(
        ssl100.out_dir)
