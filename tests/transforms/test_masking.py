"""Cuboid and patch masks (medssl/transforms/masking.py)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medssl.transforms.masking import (
    RandCuboidMaskd,
    RandPatchMaskd,
    cover_count,
    ratio_mask,
    ratio_mask_vectorised,
    sample_boxes,
)


def _img(shape=(1, 24, 24, 24), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + 0.5  # no zeros: fills are visible


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


def test_cover_count_and_ratio_mask_match_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    shape = (12, 10, 14)
    starts, sizes = sample_boxes(shape, (0.1, 0.5), torch.rand(3, 20, 3, generator=g, dtype=torch.float64),
                                 torch.rand(3, 20, 3, generator=g, dtype=torch.float64))
    ref = torch.zeros(3, *shape)
    cover = []
    for k in range(20):
        for b in range(3):
            (a, c, e), (x, y, z) = starts[b, k].tolist(), sizes[b, k].tolist()
            ref[b, a:a + x, c:c + y, e:e + z] += 1
        cover.append((ref > 0).flatten(1).float().mean(1))
    active = torch.ones(3, 20, dtype=torch.bool)
    assert torch.equal(cover_count(starts, sizes, active, shape), ref)
    ratio = torch.tensor([0.2, 0.5, 0.0])
    got = ratio_mask(starts, sizes, ratio, shape)
    assert torch.equal(ratio_mask_vectorised(starts, sizes, ratio, shape), got)  # the branch used on GPUs
    for b in range(3):
        n = next((k + 1 for k in range(20) if cover[k][b] >= ratio[b]), 20) if ratio[b] > 0 else 0
        prefix = cover_count(starts[b:b + 1, :n], sizes[b:b + 1, :n], active[b:b + 1, :n], shape) > 0
        assert torch.equal(got[b], prefix[0])
        one = ratio_mask(starts[b:b + 1], sizes[b:b + 1], ratio[b:b + 1], shape)  # per-sample (slicing) path
        assert torch.equal(one[0], got[b])


@pytest.mark.parametrize("kwargs", [{"mask_ratio": 1.5}, {"cuboid_size": (0.0, 0.2)}, {"fill": "blue"},
                                    {"mask_ratio": (0.4, 0.2)}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RandCuboidMaskd("v", **kwargs)


def test_compact_noise_fill_equals_the_full_field_form() -> None:
    from medssl.transforms.masking import fill_masked

    g = torch.Generator().manual_seed(3)
    for b, c in ((1, 1), (4, 2)):
        x = torch.rand(b, c, 6, 7, 5, generator=g) * 3 - 1
        mask = torch.rand(b, 6, 7, 5, generator=g) < 0.3
        u = torch.rand(b, c, 6, 7, 5, generator=g)
        full = fill_masked(x, mask, "noise", u)
        compact = fill_masked(x, mask, "noise", u[mask[:, None].expand_as(x)])  # masked_select order
        assert torch.allclose(full, compact, atol=1e-6)
        assert torch.equal(full[~mask[:, None].expand_as(x)], x[~mask[:, None].expand_as(x)])
