"""Labelled 90° rotations (medssl/transforms/spatial.py)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medssl.transforms.spatial import (
    RandRotate90Labeld,
    check_rotation_args,
    rotate,
    rotate_batch,
    rotation_ops,
)


def test_24_rotations_are_distinct_and_proper() -> None:
    cube = torch.rand(1, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    outs = [rotate(cube, ops, lead=1) for ops in rotation_ops(24)]
    assert len({o.numpy().tobytes() for o in outs}) == 24
    assert torch.equal(outs[0], cube)  # class 0 = identity
    # a proper rotation never equals a mirror image of the input
    mirrors = {cube.flip(d).numpy().tobytes() for d in (1, 2, 3)}
    assert not mirrors & {o.numpy().tobytes() for o in outs}


@pytest.mark.parametrize("n_classes", [4, 24])
def test_rotated_view_matches_label(n_classes: int) -> None:
    img = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    t = RandRotate90Labeld("view1", "view1_rot", n_classes=n_classes).set_random_state(0)
    seen = torch.zeros(n_classes)
    for _ in range(40 * n_classes // 4):
        out = t({"view1": MetaTensor(img)})
        k = int(out["view1_rot"])
        assert out["view1_rot"].dtype == torch.long and out["view1_rot"].ndim == 0
        seen[k] += 1
        if n_classes == 4:
            expected = torch.rot90(img, k, (1, 2))  # spatial axes (0, 1) of (C, D, H, W)
        else:
            expected = rotate(img, rotation_ops(24)[k], lead=1)
        assert torch.equal(torch.as_tensor(out["view1"]), expected)
    assert (seen > 0).all()  # every class is drawn


def test_rotation_updates_meta_affine_consistently() -> None:
    img = MetaTensor(torch.rand(1, 6, 6, 6), affine=torch.eye(4, dtype=torch.float64))
    t = RandRotate90Labeld("view1", n_classes=4).set_random_state(0)
    for _ in range(8):
        out = t({"view1": img})
        rotated_identity = int(out["view1_rot"]) == 0
        assert torch.equal(out["view1"].affine, img.affine) == rotated_identity


def test_rotate_batch_matches_per_sample() -> None:
    x = torch.rand(6, 2, 4, 4, 4)
    labels = torch.tensor([0, 5, 23, 11, 7, 5])
    out = rotate_batch(x, labels, 24)
    for i in range(6):
        assert torch.equal(out[i], rotate(x[i], rotation_ops(24)[int(labels[i])], lead=1))


def test_non_cubic_rotation_rejected() -> None:
    check_rotation_args((16, 16, 8), 4, (0, 1))
    with pytest.raises(ValueError):
        check_rotation_args((16, 16, 8), 24, (0, 1))
    with pytest.raises(ValueError):
        check_rotation_args((16, 8, 16), 4, (0, 1))
    with pytest.raises(ValueError):
        rotation_ops(10)


def test_flip_axes_frequencies_and_meta_path_agree() -> None:
    from monai.data import MetaTensor, set_track_meta

    from medssl.transforms.spatial import RandFlipAxesd

    vol = torch.arange(3 * 4 * 5, dtype=torch.float32).view(1, 3, 4, 5)
    with pytest.raises(ValueError):
        RandFlipAxesd("v", prob=1.5)
    fast = RandFlipAxesd("v", prob=0.3).set_random_state(7)
    meta = RandFlipAxesd("v", prob=0.3).set_random_state(7)
    counts = [0, 0, 0]
    for _ in range(300):
        set_track_meta(False)
        try:
            a = fast({"v": vol[:1]})["v"]
        finally:
            set_track_meta(True)
        b = meta({"v": MetaTensor(vol[:1])})["v"]
        assert type(a) is torch.Tensor and isinstance(b, MetaTensor) and torch.equal(a, b.as_tensor())
        for ax in fast.axes:
            counts[ax] += 1
    assert all(60 <= c <= 120 for c in counts)  # Binomial(300, 0.3): mean 90, sd 7.9


def test_rotation_plain_tensor_path_matches_monai() -> None:
    from monai.data import MetaTensor, set_track_meta

    vol = torch.rand(1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    for seed in range(6):
        t1 = RandRotate90Labeld("v", "r", n_classes=24).set_random_state(seed)
        t2 = RandRotate90Labeld("v", "r", n_classes=24).set_random_state(seed)
        set_track_meta(False)
        try:
            a = t1({"v": vol})
        finally:
            set_track_meta(True)
        b = t2({"v": MetaTensor(vol)})
        assert type(a["v"]) is torch.Tensor and int(a["r"]) == int(b["r"])
        assert torch.equal(a["v"], b["v"].as_tensor())
