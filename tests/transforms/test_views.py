"""Overlap-controlled two-view crops (medssl/transforms/views.py)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medssl.transforms.views import RandOverlapCropd, box_overlap, crop_boxes


def _volume(shape=(1, 40, 44, 36), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_box_overlap_known_values() -> None:
    a = torch.tensor([0, 0, 0])
    z = torch.tensor([32, 32, 32])
    assert float(box_overlap(a, z, torch.tensor([16, 0, 0]), z)) == pytest.approx(0.5)
    assert float(box_overlap(a, z, torch.tensor([32, 0, 0]), z)) == 0.0
    # smaller box fully inside the larger one: overlap 1 of the smaller crop
    assert float(box_overlap(a, z, torch.tensor([4, 4, 4]), torch.tensor([8, 8, 8]))) == 1.0


@pytest.mark.parametrize(("lo", "hi"), [(0.2, 0.5), (0.6, 0.9)])
def test_overlap_within_requested_range(lo: float, hi: float) -> None:
    t = RandOverlapCropd("image", (16, 16, 16), min_overlap=lo, max_overlap=hi, box_key="boxes")
    t.set_random_state(3)
    vol = _volume()
    ovs = []
    for _ in range(200):
        b = t({"image": vol})["boxes"]  # (V, 2, 3): start, size
        ovs.append(float(box_overlap(b[0, 0], b[0, 1], b[1, 0], b[1, 1])))
    ovs_t = torch.tensor(ovs)
    assert ((ovs_t >= lo) & (ovs_t <= hi)).float().mean() > 0.98
    assert ovs_t.std() > 0.02  # spread over the range, not a constant offset


def test_views_are_exact_crops_and_differ() -> None:
    vol = _volume()
    t = RandOverlapCropd("image", (16, 16, 16), min_overlap=0.1, max_overlap=0.6, box_key="boxes")
    t.set_random_state(0)
    out = t({"image": vol})
    assert "image" not in out
    for v, name in enumerate(("view1", "view2")):
        (s0, s1, s2), z = out["boxes"][v, 0].tolist(), out["boxes"][v, 1].tolist()
        assert z == [16, 16, 16]
        assert torch.equal(torch.as_tensor(out[name]), vol[:, s0:s0 + 16, s1:s1 + 16, s2:s2 + 16])
    assert not torch.equal(torch.as_tensor(out["view1"]), torch.as_tensor(out["view2"]))


def test_determinism_under_seed() -> None:
    vol = _volume()

    def run(seed: int) -> torch.Tensor:
        t = RandOverlapCropd("image", (16, 16, 16), scale=(0.5, 1.0)).set_random_state(seed)
        return torch.cat([torch.as_tensor(t({"image": vol})[k]) for k in ("view1", "view2")])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_scale_resizes_to_roi_and_pads_small_volumes() -> None:
    t = RandOverlapCropd("image", (16, 16, 16), scale=(0.5, 0.75), box_key="boxes").set_random_state(1)
    out = t({"image": _volume((1, 30, 30, 30))})
    assert out["view1"].shape == (1, 16, 16, 16) and out["view2"].shape == (1, 16, 16, 16)
    sizes = out["boxes"][:, 1]
    assert ((sizes >= 8) & (sizes <= 12)).all()
    small = RandOverlapCropd("image", (16, 16, 16), box_key="boxes").set_random_state(0)
    out = small({"image": torch.ones(1, 10, 20, 12)})
    assert out["view1"].shape == (1, 16, 16, 16)
    # the 10-voxel axis is padded with 3 zeros before and after (centred): zeros appear, ones survive
    assert float(out["view1"].min()) == 0.0 and float(out["view1"].max()) == 1.0


def test_meta_tensor_affine_follows_crop() -> None:
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    vol = MetaTensor(_volume(), affine=affine)
    t = RandOverlapCropd("image", (16, 16, 16), n_candidates=1, box_key="boxes").set_random_state(2)
    out = t({"image": vol})
    start = out["boxes"][0, 0].double()
    assert isinstance(out["view1"], MetaTensor)
    expected = affine.clone()
    expected[:3, 3] = affine[:3, :3] @ start
    assert torch.allclose(out["view1"].affine, expected)


def test_crop_boxes_is_pure_and_single_view() -> None:
    ext = torch.tensor([[40, 40, 40], [20, 20, 20]])
    u = torch.rand(2, 1, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    a = crop_boxes(ext, (16, 16, 16), (1.0, 1.0), 0, 1, *u, None)
    b = crop_boxes(ext, (16, 16, 16), (1.0, 1.0), 0, 1, *u, None)
    assert torch.equal(a[0], b[0]) and a[0].shape == (2, 1, 3)
    assert (a[0] + a[1] <= ext[:, None]).all() and (a[0] >= 0).all()


@pytest.mark.parametrize("kwargs", [{"roi_size": (16, 16)}, {"scale": (0.0, 1.0)},
                                    {"min_overlap": 0.8, "max_overlap": 0.5}, {"view_keys": ("a", "b", "c")}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    args = {"roi_size": (16, 16, 16), **kwargs}
    with pytest.raises(ValueError):
        RandOverlapCropd("image", **args)
