"""Models Genesis distortions (medssl/transforms/genesis.py)."""

from __future__ import annotations

import torch
from monai.data import MetaTensor

from medssl.transforms.genesis import RandBezierRemapd, RandInOutPaintd, bezier_lut, bezier_remap


def test_bezier_curves_are_monotone_with_fixed_ends() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, 4, generator=g, dtype=torch.float64)
    invert = torch.arange(64) % 2 == 1
    lut = bezier_lut(u, invert)
    grid = torch.linspace(0, 1, 101).expand(64, 101).contiguous()
    y = bezier_remap(grid, lut)
    d = y.diff(dim=1)
    assert torch.all(d[~invert] >= -1e-6) and torch.all(d[invert] <= 1e-6)
    assert torch.allclose(y[~invert, 0], torch.zeros(32), atol=1e-5)
    assert torch.allclose(y[~invert, -1], torch.ones(32), atol=1e-5)
    assert torch.allclose(y[invert, 0], torch.ones(32), atol=1e-5)
    assert y.min() >= 0 and y.max() <= 1
    assert (y[~invert] - grid[~invert]).abs().amax(1).mean() > 0.05  # non-trivial curves


def test_bezier_transform_is_seeded_and_keeps_meta() -> None:
    affine = torch.diag(torch.tensor([2.0, 2, 2, 1], dtype=torch.float64))
    img = MetaTensor(torch.rand(1, 8, 8, 8), affine=affine)
    a = RandBezierRemapd("v", prob=1.0).set_random_state(3)({"v": img})["v"]
    b = RandBezierRemapd("v", prob=1.0).set_random_state(3)({"v": img})["v"]
    c = RandBezierRemapd("v", prob=1.0).set_random_state(4)({"v": img})["v"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert isinstance(a, MetaTensor) and torch.equal(a.affine, img.affine)
    assert a.shape == img.shape and a.dtype == torch.float32
    # a monotone map preserves (or reverses) the voxel order
    order = img.as_tensor().flatten().argsort()
    s = a.as_tensor().flatten()[order].diff()
    assert bool((s >= -1e-6).all()) or bool((s <= 1e-6).all())


def test_in_and_out_painting_masks() -> None:
    img = torch.rand(1, 21, 21, 21, generator=torch.Generator().manual_seed(0))
    fracs = {True: [], False: []}
    t = RandInOutPaintd("v", prob=1.0, outpaint_prob=0.5, mask_key="m").set_random_state(0)
    for _ in range(40):
        out = t({"v": img})
        m = out["m"].bool()
        v = torch.as_tensor(out["v"])
        assert torch.equal(v[~m], img[~m])  # outside the noise region nothing changes
        assert not torch.equal(v[m], img[m]) and float(m.float().mean()) > 0
        outpaint = bool(m[0, 0, 0, 0] & m[0, -1, -1, -1])  # corners are noise only when out-painting...
        fracs[outpaint].append(float(m.float().mean()))
    # ...where most of the volume is noise; in-painting boxes (≤ 1/3 side) cover much less
    assert fracs[True] and fracs[False]
    assert min(fracs[True]) > 0.3 and sum(fracs[False]) / len(fracs[False]) < 0.15
