from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.engines.pretrain.data import CropBatcher, preprocessing
from medssl.engines.pretrain.pool import load_pool, pool_channels, pool_fingerprint
from medssl.engines.pretrain.pool_cache import SafeCacheDataset
from medssl.errors import MedsslError


def _dataset(datalist: Path) -> SafeCacheDataset:
    return SafeCacheDataset(
        load_pool(datalist), preprocessing("robust"), runtime_cache=True, copy_cache=False, progress=False
    )


def test_pool_sections_and_held_out_cases(tiny_datalist: Path, tmp_path: Path) -> None:
    pool = load_pool(tiny_datalist)
    assert len(pool) == 6 and all(Path(p["image"]).is_absolute() for p in pool)
    layout = {  # what `medssl split` writes (version 1 had no pretrain_pool)
        "version": 1,
        "test": ["case2"],
        "seeds": {"0": {"validation": ["case1"], "fractions": {}}, "1": {"validation": ["case3"], "fractions": {}}},
        "unlabeled": {"0": ["case0", "case3", "case4", "case5"], "1": ["case0", "case1", "case4", "case5"]},
    }
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps(layout))
    # default: the study-wide pool, outside the test set and EVERY seed's validation set (derived for v1)
    assert {p["case_id"] for p in load_pool(tiny_datalist, splits=splits)} == {"case0", "case4", "case5"}
    splits.write_text(json.dumps(layout | {"version": 2, "pretrain_pool": ["case4", "case5"]}))
    assert {p["case_id"] for p in load_pool(tiny_datalist, splits=splits)} == {"case4", "case5"}
    # an explicit split_seed picks that seed's own pool
    assert {p["case_id"] for p in load_pool(tiny_datalist, splits=splits, split_seed=1)} == {
        "case0",
        "case1",
        "case4",
        "case5",
    }
    with pytest.raises(MedsslError, match="split seed 7"):
        load_pool(tiny_datalist, splits=splits, split_seed=7)
    other = tmp_path / "other.json"  # no per-seed pool: every val/test case id is excluded
    other.write_text(json.dumps({"folds": {"0": {"val": ["case1"], "test": ["case2"], "train": ["case3"]}}}))
    assert {p["case_id"] for p in load_pool(tiny_datalist, splits=other)} == {
        "case0",
        "case3",
        "case4",
        "case5",
    }
    with pytest.raises(MedsslError, match="no pretraining images"):
        load_pool(tiny_datalist, sections=["validation"])


def test_preprocessing_normalises_every_scale(tiny_datalist: Path) -> None:
    ds = _dataset(tiny_datalist)
    for i in range(len(ds)):
        img = ds[i]["image"]
        assert img.ndim == 4 and img.shape[0] == 1 and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and float(img.max()) > 0.9


def test_batcher_windows_and_restores_position(tiny_datalist: Path) -> None:
    ds = _dataset(tiny_datalist)
    a = CropBatcher(ds, (20, 20, 20), seed=3)  # volumes are 14-24 voxels per side: some axes cut
    first = a.next_batch(4)
    assert len(first) == 4 and all(v.shape[0] == 1 and max(v.shape[1:]) <= 20 for v in first)
    assert any(min(v.shape[1:]) < 20 for v in first)  # smaller axes kept whole (the augmentation pads)
    state = a.state_dict()
    assert state == {"epoch": 0, "position": 4, "order_seed": 3}
    nxt = [a.next_batch(4) for _ in range(3)]  # crosses into epoch 1 and 2
    assert a.epoch == 2
    b = CropBatcher(ds, (20, 20, 20), seed=3)
    b.load_state_dict(state)
    for batch in nxt:
        assert all(torch.equal(x, y) for x, y in zip(b.next_batch(4), batch, strict=True))
    c = CropBatcher(ds, (20, 20, 20), seed=3)  # a pure function of (seed, epoch, position)
    assert all(torch.equal(x, y) for x, y in zip(c.next_batch(4), first, strict=True))
    other = CropBatcher(ds, (20, 20, 20), seed=4).next_batch(4)
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(other, first, strict=True))
    whole = CropBatcher(ds, None, seed=3).next_batch(6)  # no source_size: every volume whole, once per epoch
    assert sorted(v.numel() for v in whole) == sorted(ds[i]["image"].numel() for i in range(6))


def test_bad_volume_is_logged_and_skipped(
    tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    data = json.loads(tiny_datalist.read_text())
    items = [
        {"image": str(tiny_datalist.parent / it["image"]), "case_id": it["case_id"]}
        for it in data["unlabeled"]
    ]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"unlabeled": items[:2] + [{"image": str(bad), "case_id": "bad"}]}))
    batcher = CropBatcher(_dataset(dl), (8, 8, 8), seed=0)
    with caplog.at_level(logging.WARNING, logger="medssl"):
        batches = [batcher.next_batch(2) for _ in range(3)]  # three epochs over 2 good volumes
    assert all(len(b) == 2 and all(v.shape == (1, 8, 8, 8) for v in b) for b in batches)
    assert (
        list(batcher.skipped) == [2] and "broken.nii.gz" in caplog.text and "skipping volume" in caplog.text
    )
    assert caplog.text.count("skipping volume") == 1  # remembered, not retried every epoch
    dl.write_text(json.dumps({"unlabeled": [{"image": str(bad), "case_id": "bad"}]}))
    with pytest.raises(MedsslError, match="every volume"):
        CropBatcher(_dataset(dl), (8, 8, 8)).next_batch(1)


def write_two_channel(folder: Path, n: int = 4) -> Path:
    """``n`` cases of two 10³ NIfTI channels (``t1``, ``t2``; t2 = 100 × t1 + 5) + a multi-channel datalist."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        t1 = rng.random((10, 10, 10)).astype(np.float32)
        for name, data in (("t1", t1), ("t2", 100 * t1 + 5)):
            nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"c{i}_{name}.nii.gz")
        items.append({"image": [f"c{i}_t1.nii.gz", f"c{i}_t2.nii.gz"], "channels": ["t1", "t2"],
                      "case_id": f"case{i}", "group_id": f"p{i}"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "unlabeled": items}))
    return path


def test_multi_channel_items_load_as_channels(tmp_path: Path) -> None:
    dl = write_two_channel(tmp_path / "mc")
    pool = load_pool(dl)
    assert len(pool) == 4 and pool[0]["channels"] == ["t1", "t2"] and pool_channels(pool) == 2
    assert [Path(p).name for p in pool[0]["image"]] == ["c0_t1.nii.gz", "c0_t2.nii.gz"]
    img = preprocessing("robust")({"image": pool[0]["image"]})["image"]
    assert tuple(img.shape) == (2, 10, 10, 10)  # MONAI stacks the list of files as channels
    assert torch.allclose(img[0], img[1], atol=1e-4)  # each channel normalised on its own (t2 = 100 t1 + 5)
    fp = pool_fingerprint(pool)
    (tmp_path / "mc" / "c0_t2.nii.gz").write_bytes(b"x")  # a second channel file changes the fingerprint
    assert pool_fingerprint(pool) != fp
    single = [{"image": str(tmp_path / "mc" / "c1_t1.nii.gz"), "case_id": "s"}]
    with pytest.raises(MedsslError, match=r"case s has 1, case case0 has 2"):
        pool_channels(pool + single, "dl.json")
    assert pool_channels([{**single[0], "channels": ["t1", "t2"]}]) == 2  # an MSD 4D file: one path, 2 channels
