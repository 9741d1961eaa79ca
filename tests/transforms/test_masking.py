"""Cuboid/patch masks and local shuffling (medssl/transforms/masking.py)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medssl.transforms.masking import (
    RandCuboidMaskd,
    RandLocalShuffled,
    RandPatchMaskd,
    boxes_mask,
    sample_boxes,
    shuffle_blocks,
)


def _img(shape=(1, 24, 24, 24), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5  # no zeros: fills are visible


@pytest.mark.parametrize("ratio", [0.1, 0.4])
def test_cuboid_mask_reaches_ratio(ratio: float) -> None:
    t = RandCuboidMaskd("v", mask_ratio=ratio, cuboid_size=(0.1, 0.2), mask_key="m").set_random_state(0)
    img = _img()
    for _ in range(10):
        out = t({"v": img})
        m = out["m"]
        assert m.shape == (1, 24, 24, 24) and m.dtype == torch.float32
        frac = float(m.mean())
        # reached from above by less than one (at most 5³-voxel) box
        assert ratio <= frac <= ratio + 125 / 24**3 + 1e-9
        v = torch.as_tensor(out["v"])
        assert torch.all(v[m.bool()] == 0) and torch.equal(v[~m.bool()], img[~m.bool()])


def test_cuboid_ratio_range_and_noise_fill_keep_meta() -> None:
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    img = MetaTensor(_img(), affine=affine)
    t = RandCuboidMaskd("v", mask_ratio=(0.1, 0.3), fill="noise", mask_key="m").set_random_state(1)
    fracs = []
    for _ in range(30):
        out = t({"v": img})
        assert isinstance(out["v"], MetaTensor) and torch.equal(out["v"].affine, affine)
        m = out["m"].bool()
        assert float(out["v"][m].min()) >= float(img.min()) and float(out["v"][m].max()) <= float(img.max())
        assert not torch.equal(torch.as_tensor(out["v"])[m], img.as_tensor()[m])
        fracs.append(float(out["m"].mean()))
    assert 0.1 <= min(fracs) and max(fracs) <= 0.33 and max(fracs) - min(fracs) > 0.1


def test_mask_key_written_even_when_not_applied_and_ored() -> None:
    img = _img()
    out = RandCuboidMaskd("v", mask_key="m", prob=0.0)({"v": img})
    assert torch.equal(out["v"], img) and float(out["m"].sum()) == 0.0
    prior = torch.zeros(1, 24, 24, 24)
    prior[0, 0, 0, 0] = 1
    out = RandPatchMaskd("v", 0.5, (8, 8, 8), mask_key="m").set_random_state(0)({"v": img, "m": prior})
    assert float(out["m"][0, 0, 0, 0]) == 1.0


def test_patch_mask_exact_ratio_and_alignment() -> None:
    t = RandPatchMaskd("v", mask_ratio=0.75, patch_size=(8, 8, 8), mask_key="m").set_random_state(0)
    masks = [t({"v": _img()})["m"] for _ in range(5)]
    for m in masks:
        patches = m[0].view(3, 8, 3, 8, 3, 8).permute(0, 2, 4, 1, 3, 5).reshape(27, -1)
        assert torch.all(patches.min(1).values == patches.max(1).values)  # whole patches
        assert int(patches[:, 0].sum()) == round(0.75 * 27)
    assert not torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError):
        t({"v": _img((1, 20, 24, 24))})


def test_local_shuffle_permutes_within_blocks_only() -> None:
    img = _img((2, 16, 16, 16))
    t = RandLocalShuffled("v", n_blocks=40, block_size=(0.1, 0.3), mask_key="m", prob=1.0).set_random_state(0)
    out = t({"v": img})
    v, m = torch.as_tensor(out["v"]), out["m"].bool()[0]
    assert torch.equal(v[:, ~m], img[:, ~m])  # untouched outside the blocks
    assert not torch.equal(v, img)
    for c in range(2):  # each channel's values are only permuted
        assert torch.equal(v[c].flatten().sort().values, img[c].flatten().sort().values)
    # the same permutation for every channel: the channel difference is permuted alike
    assert torch.equal((v[1] - v[0]).flatten().sort().values, (img[1] - img[0]).flatten().sort().values)
    again = RandLocalShuffled("v", n_blocks=40, block_size=(0.1, 0.3), prob=1.0).set_random_state(0)({"v": img})
    assert torch.equal(torch.as_tensor(again["v"]), v)


def test_shuffle_blocks_each_block_keeps_its_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 12, 12, 12, generator=g)
    starts, sizes = sample_boxes((12, 12, 12), (0.2, 0.4), torch.rand(3, 2, 3, generator=g, dtype=torch.float64),
                                 torch.rand(3, 2, 3, generator=g, dtype=torch.float64))
    out, m = shuffle_blocks(x, starts, sizes, torch.rand(3, 12**3, generator=g, dtype=torch.float64))
    for b in range(3):
        last = boxes_mask(starts[b:b + 1, 1:], sizes[b:b + 1, 1:], torch.ones(1, 1, dtype=torch.bool), (12, 12, 12))[0]
        first = boxes_mask(starts[b:b + 1, :1], sizes[b:b + 1, :1], torch.ones(1, 1, dtype=torch.bool),
                           (12, 12, 12))[0] & ~last  # the later block owns shared voxels
        for region in (first, last):
            assert torch.equal(out[b, 0][region].sort().values, x[b, 0][region].sort().values)
        assert torch.equal(m[b], first | last)


@pytest.mark.parametrize("kwargs", [{"mask_ratio": 1.5}, {"cuboid_size": (0.0, 0.2)}, {"fill": "blue"},
                                    {"mask_ratio": (0.4, 0.2)}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RandCuboidMaskd("v", **kwargs)
