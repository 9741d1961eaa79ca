"""Rotation prediction trains and reaches the labels it is given."""

from __future__ import annotations

import pytest
import torch

from medssl.methods import build_method
from medssl.networks.encoders import build_encoder


def test_trains(check_trains) -> None:
    enc = build_encoder(
        "segresnet", img_size=(16, 16, 16), init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)
    )
    m = build_method("rotation", enc, n_rotations=4, hidden_dim=16)
    check_trains(m, size=16, lr=3e-3)
    with pytest.raises(ValueError, match="n_rotations"):
        build_method("rotation", enc, n_rotations=1)


def test_learns_actual_rotations(make_batch) -> None:
    # label = number of 90° turns in the H-W plane of a fixed asymmetric volume: learnable signal
    torch.manual_seed(0)
    base = torch.zeros(1, 1, 16, 16, 16)
    base[..., 2:6, 2:10, 3:5] = 1.0
    rot = torch.arange(4).repeat(2)  # (8,)
    views = torch.cat([torch.rot90(base, int(k), dims=(3, 4)) for k in rot]) + 0.05 * torch.randn(
        8, 1, 16, 16, 16
    )
    enc = build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.125)
    m = build_method("rotation", enc, n_rotations=4)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(20):
        out = m({"view1": views, "view1_rot": rot})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():  # train-mode BN (batch statistics): running stats are not settled after 20 steps
        out = m({"view1": views, "view1_rot": rot})
    assert float(out["rotation_acc"]) == 1.0 and float(out["loss"]) < 0.5
