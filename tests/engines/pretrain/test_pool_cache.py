"""Rank-sharded pools and the persistent on-disk pool cache (:mod:`medssl.engines.pretrain.pool_cache`)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Lambdad

from medssl.engines.pretrain.data import CropBatcher, preprocessing, preprocessing_recipe
from medssl.engines.pretrain.pool import load_pool
from medssl.engines.pretrain.pool_cache import (
    DiskCacheDataset,
    ShardView,
    make_pool_dataset,
    recipe_key,
    shard_indices,
)
from medssl.errors import MedsslError
from tests.engines.conftest import toy_config

PREP = preprocessing_recipe("robust")


# -- sharding ------------------------------------------------------------------------------------------
def test_pool_partition_is_disjoint_padded_and_identity_on_one_process() -> None:
    assert np.array_equal(shard_indices(7, 3, 0, 1, "pool"), np.arange(7))
    assert np.array_equal(shard_indices(7, 3, 1, 2, "order"), np.arange(7))
    parts = [shard_indices(7, 3, r, 2, "pool") for r in range(2)]
    assert [len(p) for p in parts] == [4, 4] and set(parts[0]) | set(parts[1]) == set(range(7))
    assert len(set(parts[0]) & set(parts[1])) == 1  # the one padding repeat
    assert sorted(parts[0]) != [0, 1, 2, 3]  # seeded permutation, not a contiguous cut
    assert not np.array_equal(parts[0], shard_indices(7, 4, 0, 2, "pool"))  # the seed moves it
    three = [set(shard_indices(12, 0, r, 3, "pool")) for r in range(3)]
    assert all(len(p) == 4 for p in three) and set.union(*three) == set(range(12))
    with pytest.raises(MedsslError, match="data_shard"):
        shard_indices(4, 0, 0, 2, "volume")


def _stream(batcher: CropBatcher, steps: int, b: int) -> list[torch.Tensor]:
    return [v for _ in range(steps) for v in batcher.next_batch(b)]


def test_one_process_stream_is_bit_identical_in_both_modes_and_to_before() -> None:
    data = [{"image": torch.rand(1, 20, 20, 20)} for _ in range(5)]
    order, pool = CropBatcher(data, (8, 8, 8), seed=3), CropBatcher(data, (8, 8, 8), seed=3, shard="pool")
    a, b = _stream(order, 7, 2), _stream(pool, 7, 2)  # 14 draws: across two epoch boundaries
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the formula every existing checkpoint was written with: permutation(seed, epoch), windows (seed, e, pos, 1)
    ref = []
    for epoch in range(3):
        for pos, idx in enumerate(np.random.default_rng([3, epoch]).permutation(5)):
            rng = np.random.default_rng([3, epoch, pos, 1])
            st = [int(rng.integers(0, 20 - 8 + 1)) for _ in range(3)]
            ref.append(data[idx]["image"][:, st[0] : st[0] + 8, st[1] : st[1] + 8, st[2] : st[2] + 8])
    assert all(torch.equal(x, y) for x, y in zip(a, ref[:14], strict=True))
    # an old single-process checkpoint's data state (no shard key) resumes exactly in pool mode too
    old_state = {"epoch": 1, "position": 3, "order_seed": 3}
    assert pool.state_dict().keys() == old_state.keys()
    resumed = CropBatcher(data, (8, 8, 8), seed=3, shard="pool")
    resumed.load_state_dict(old_state)
    assert all(torch.equal(x, y) for x, y in zip(resumed.next_batch(4), ref[8:12], strict=True))


class _Spy(list):
    """A shard's dataset that records which pool indices were read."""

    def __init__(self, items: list, part: np.ndarray, touched: list[int]) -> None:
        super().__init__(items)
        self.part, self.touched = part, touched

    def __getitem__(self, j):  # noqa: ANN001, ANN204
        self.touched.append(int(self.part[j]))
        return list.__getitem__(self, j)


def test_pool_shard_draws_only_its_part_and_resumes_exactly(caplog: pytest.LogCaptureFixture) -> None:
    vols = [{"image": torch.full((1, 6, 6, 6), float(i))} for i in range(9)]
    for rank in range(2):
        part = shard_indices(9, 5, rank, 2, "pool")
        touched: list[int] = []
        view = ShardView(_Spy([vols[i] for i in part], part, touched), part, 9)  # the engine's rank dataset
        batcher = CropBatcher(view, None, seed=5, rank=rank, world_size=2, shard="pool")
        seen = [int(v.flatten()[0]) for v in _stream(batcher, 6, 3)]  # 18 draws = 3.5 epochs of 5
        assert set(touched) == set(part) and set(seen) == set(part.tolist())
        assert sorted(seen[:5]) == sorted(part.tolist())  # each epoch a permutation of the part
        assert seen[:5] != seen[5:10]  # reshuffled every epoch
        state = batcher.state_dict()
        assert state["shard"] == "pool" and state["world_size"] == 2 and state["rank"] == rank
        again = CropBatcher(view, None, seed=5, rank=rank, world_size=2, shard="pool")
        again.load_state_dict(state)
        cont = CropBatcher(view, None, seed=5, rank=rank, world_size=2, shard="pool")
        _stream(cont, 6, 3)
        assert [int(v.flatten()[0]) for v in again.next_batch(7)] == [int(v.flatten()[0]) for v in cont.next_batch(7)]
        with pytest.raises(IndexError, match="not in this rank's shard"):
            view[int(next(i for i in range(9) if i not in part))]
    with caplog.at_level(logging.WARNING, logger="medssl"):  # mode switch on resume: said, not silent
        CropBatcher(vols, None, seed=5, rank=0, world_size=2).load_state_dict(state | {"rank": 0})
    assert "data_shard" in caplog.text


# -- the disk cache ------------------------------------------------------------------------------------
def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pt"))


def test_disk_cache_equals_ram_is_keyed_by_recipe_and_file(tiny_datalist: Path, tmp_path: Path) -> None:
    pool = load_pool(tiny_datalist)
    ram = make_pool_dataset(pool, preprocessing("robust"), cache="ram")
    disk = make_pool_dataset(pool, preprocessing("robust"), cache="disk", cache_dir=tmp_path / "c", prep=PREP)
    for i in range(len(pool)):
        assert torch.equal(torch.as_tensor(ram[i]["image"]), disk[i]["image"])
    folder = tmp_path / "c" / recipe_key(PREP)
    assert len(_entries(tmp_path / "c")) == len(pool) and json.loads((folder / "recipe.json").read_text())[
        "normalisation"] == "robust"  # fmt: skip
    assert not list(folder.glob(".tmp-*"))  # atomic writes leave no temporaries
    # a second run reads the entries, never preprocessing again
    def boom(_):  # noqa: ANN001, ANN202
        raise AssertionError("preprocessed again despite a cache hit")

    again = DiskCacheDataset(pool, Compose([Lambdad("image", boom)]), tmp_path / "c", PREP)
    assert torch.equal(again[2]["image"], disk[2]["image"])
    # another recipe: another folder, never the stale entries
    ct = preprocessing_recipe("ct")
    assert recipe_key(ct) != recipe_key(PREP)
    other = DiskCacheDataset(pool, preprocessing("ct"), tmp_path / "c", ct)
    assert not torch.equal(other[2]["image"], disk[2]["image"]) and len(_entries(tmp_path / "c")) == len(pool) + 1
    # a rewritten file (a copy: the session's volumes stay as they are): a new entry with the new content
    before, path = disk[2]["image"], tmp_path / "vol2.nii.gz"
    img = nib.load(pool[2]["image"])
    nib.save(img, path)
    moved = [*pool[:2], {"image": str(path), "case_id": "case2"}]
    assert torch.equal(DiskCacheDataset(moved, preprocessing("robust"), tmp_path / "c", PREP)[2]["image"], before)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh = DiskCacheDataset(moved, preprocessing("robust"), tmp_path / "c", PREP)[2]["image"]
    assert not torch.equal(fresh, before)
    assert torch.equal(fresh, preprocessing("robust")({"image": str(path)})["image"])
    with pytest.raises(MedsslError, match="needs cache_dir"):
        make_pool_dataset(pool, preprocessing("robust"), cache="disk")
    with pytest.raises(MedsslError, match="cache must be one of"):
        make_pool_dataset(pool, preprocessing("robust"), cache="lmdb")


def test_disk_cache_quarantines_bad_volume_and_recovers_corrupt_entry(
    tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    pool = load_pool(tiny_datalist)[:2] + [{"image": str(bad), "case_id": "bad"}]
    ds = make_pool_dataset(pool, preprocessing("robust"), cache="disk", cache_dir=tmp_path / "c", prep=PREP)
    batcher = CropBatcher(ds, (8, 8, 8), seed=0)
    with caplog.at_level(logging.WARNING, logger="medssl"):
        batches = [batcher.next_batch(2) for _ in range(3)]
    assert all(len(b) == 2 for b in batches) and list(batcher.skipped) == [2]
    assert "broken.nii.gz" in caplog.text and len(_entries(tmp_path / "c")) == 2  # the marker is not written
    entry = _entries(tmp_path / "c")[0]
    entry.write_bytes(b"truncated")  # e.g. a node died mid-copy on a foreign file system
    with caplog.at_level(logging.WARNING, logger="medssl"):
        again = DiskCacheDataset(pool, preprocessing("robust"), tmp_path / "c", PREP)
        items = [again[i] for i in range(2)]
    assert "unreadable" in caplog.text and all(it["image"].shape[0] == 1 for it in items)
    assert all(torch.load(p, weights_only=True)["image"].ndim == 4 for p in _entries(tmp_path / "c"))


def _build(args: tuple[list, str]) -> list[float]:
    pool, root = args
    ds = DiskCacheDataset(pool, preprocessing("robust"), root, PREP)
    return [float(ds[i]["image"].sum()) for i in range(len(pool))]


def test_two_builders_at_once_write_one_consistent_cache(tiny_datalist: Path, tmp_path: Path) -> None:
    pool = load_pool(tiny_datalist)
    with mp.get_context("fork").Pool(2) as workers:  # two "ranks" filling the same empty cache at once
        sums = workers.map(_build, [(pool, str(tmp_path / "c"))] * 2)
    assert sums[0] == pytest.approx(sums[1])
    assert len(_entries(tmp_path / "c")) == len(pool)
    assert not list((tmp_path / "c").rglob(".tmp-*"))
    assert _build((pool, str(tmp_path / "c"))) == pytest.approx(sums[0])


# -- config and engine ---------------------------------------------------------------------------------
def test_disk_cache_run_equals_ram_run_and_resumes_it(tiny_datalist: Path, tmp_path: Path) -> None:
    from medssl.engines.pretrain.engine import run_pretraining
    from medssl.engines.studies.identity import pretrain_identity

    with pytest.raises(ValueError, match="needs cache_dir"):
        toy_config(tiny_datalist, tmp_path / "x", cache="disk")
    with pytest.raises(ValueError, match="data_shard"):
        toy_config(tiny_datalist, tmp_path / "x", data_shard="rows")
    ram = run_pretraining(toy_config(tiny_datalist, tmp_path / "ram", checkpoint_every=3), progress=False)
    cfg = toy_config(tiny_datalist, tmp_path / "disk", cache="disk", cache_dir=str(tmp_path / "cache"),
                     data_shard="pool")  # fmt: skip
    disk = run_pretraining(cfg, progress=False)
    assert disk.loss_history == ram.loss_history  # same stream, same losses: storage is not the recipe
    assert 0 < len(_entries(tmp_path / "cache")) <= 6
    # a checkpoint written with the RAM cache resumes with the disk cache: the same steps 4-6
    step3 = tmp_path / "ram" / "checkpoints" / "step_0000003.pt"
    resumed = run_pretraining(cfg.replace(out_dir=str(tmp_path / "res")), resume=step3, progress=False)
    assert resumed.loss_history == ram.loss_history[3:]
    # storage fields never change a sweep's pretraining identity; the default shard is hash-neutral
    assert pretrain_identity(cfg.replace(data_shard="order")) == pretrain_identity(
        toy_config(tiny_datalist, tmp_path / "ram"))  # fmt: skip
    assert pretrain_identity(cfg)["data_shard"] == "pool"
