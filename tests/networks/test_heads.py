"""Heads: MLP from block lists, preset heads, reconstruction head shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.networks.heads import (
    ProjectionHead,
    ReconstructionHead,
    byol_predictor,
    byol_projection,
    rotation_head,
    simclr_projection,
    vicreg_expander,
)


def test_projection_head_from_blocks() -> None:
    head = ProjectionHead([(6, 10, "batch", "relu"), (10, 4, "layer", "gelu"), (4, 3, None, None)])
    out = head(torch.randn(5, 6))
    assert out.shape == (5, 3) and head.in_features == 6 and head.out_features == 3
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [lin.bias is None for lin in linears] == [True, True, False]  # no bias before a norm
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 1
    assert sum(isinstance(m, nn.LayerNorm) for m in head.modules()) == 1
    # lists from a JSON/YAML config work the same
    assert ProjectionHead([[6, 4, None, "relu"]])(torch.randn(2, 6)).shape == (2, 4)


def test_presets() -> None:
    x = torch.randn(4, 16)
    assert simclr_projection(16, 32, 8)(x).shape == (4, 8)
    assert byol_predictor(8, 32, 8)(byol_projection(16, 32, 8)(x)).shape == (4, 8)
    v = vicreg_expander(16, 32, 24)
    assert v(x).shape == (4, 24) and sum(isinstance(m, nn.BatchNorm1d) for m in v.modules()) == 2
    assert rotation_head(16, 10)(x).shape == (4, 10)


@pytest.mark.parametrize(
    "blocks, match",
    [
        ([], "at least one"),
        ([(4, 5, None, None), (6, 2, None, None)], "expects 6"),
        ([(4, 5, "group", None)], "norm"),
        ([(4, 5, None, "tanh")], "act"),
        ([(4, 5, None)], "in, out, norm, act"),
    ],
)
def test_projection_head_validation(blocks: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProjectionHead(blocks)


@pytest.mark.parametrize("mode", ["deconv", "upsample"])
def test_reconstruction_head(mode: str) -> None:
    head = ReconstructionHead(in_channels=32, out_channels=1, num_upsamples=3, mode=mode)
    y = head(torch.randn(2, 32, 2, 2, 2))
    assert y.shape == (2, 1, 16, 16, 16)
    y.mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="mode"):
        ReconstructionHead(8, 1, 2, mode="pixelshuffle")
