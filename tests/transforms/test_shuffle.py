"""Models-Genesis local voxel shuffling (medssl/transforms/shuffle.py)."""

from __future__ import annotations

import torch

from medssl.transforms.shuffle import RandLocalShuffled, shuffle_cells


def _img(shape=(1, 24, 24, 24), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + 0.5


def test_local_shuffle_permutes_within_blocks_only() -> None:
    img = _img((2, 16, 16, 16))
    t = RandLocalShuffled("v", ratio=0.5, cell_size=(0.1, 0.3), mask_key="m", prob=1.0).set_random_state(0)
    out = t({"v": img})
    v, m = torch.as_tensor(out["v"]), out["m"].bool()[0]
    assert torch.equal(v[:, ~m], img[:, ~m])  # untouched outside the blocks
    assert not torch.equal(v, img)
    for c in range(2):  # each channel's values are only permuted
        assert torch.equal(v[c].flatten().sort().values, img[c].flatten().sort().values)
    # the same permutation for every channel: the channel difference is permuted alike
    assert torch.equal((v[1] - v[0]).flatten().sort().values, (img[1] - img[0]).flatten().sort().values)
    assert 0.1 < float(m.float().mean()) < 0.7  # ≈ ratio of the full (non-border) cells
    again = RandLocalShuffled("v", ratio=0.5, cell_size=(0.1, 0.3), prob=1.0).set_random_state(0)({"v": img})
    assert torch.equal(torch.as_tensor(again["v"]), v)


def test_shuffle_cells_permute_within_each_cell() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 11, 12, 10, generator=g)
    cell, offset = (3, 4, 2), (1, 0, 1)
    n, nv = 4 * 3 * 6, 24  # ceil((11+1)/3), ceil(12/4), ceil((10+1)/2) cells of 3*4*2 voxels
    out, m = shuffle_cells(x, cell, offset, torch.rand(2, n, generator=g, dtype=torch.float64),
                           torch.rand(2, n, nv, generator=g), ratio=0.6)
    assert torch.equal(out[:, 0][~m], x[:, 0][~m]) and not torch.equal(out, x)
    for b in range(2):  # every full cell keeps its multiset of values; partial border cells never move
        for i in range(3):
            for j in range(3):
                for k in range(6):
                    lo = (i * 3 - 1, j * 4, k * 2 - 1)
                    if min(lo) < 0 or lo[0] + 3 > 11 or lo[2] + 2 > 10:
                        continue
                    sl = (b, 0, slice(lo[0], lo[0] + 3), slice(lo[1], lo[1] + 4), slice(lo[2], lo[2] + 2))
                    assert torch.equal(out[sl].flatten().sort().values, x[sl].flatten().sort().values)
                    cell_mask = m[b, lo[0]:lo[0] + 3, lo[1]:lo[1] + 4, lo[2]:lo[2] + 2]
                    assert bool(cell_mask.all()) or not bool(cell_mask.any())  # whole cells
