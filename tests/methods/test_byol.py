"""BYOL: EMA target updated by the engine hook with the cosine momentum schedule."""

from __future__ import annotations

import pytest
import torch

from medssl.methods import build_method
from medssl.methods.byol import byol_momentum
from medssl.networks.encoders import build_encoder


def test_momentum_schedule() -> None:
    assert byol_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert byol_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert byol_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)


def test_ema_update_and_training(check_trains, make_batch) -> None:
    enc = build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.125)
    m = build_method("byol", enc, hidden_dim=32, out_dim=16, base_momentum=0.9)
    assert all(not p.requires_grad for p in m.target_encoder.parameters())
    online0 = [p.detach().clone() for p in m.encoder.parameters()]
    target0 = [p.detach().clone() for p in m.target_encoder.parameters()]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    m.on_step_end(0, 10)  # momentum 0.9: target = 0.9 target + 0.1 online
    for t0, o0, t in zip(target0, online0, m.target_encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * (o0 + 1.0))
    assert float(m.momentum) == pytest.approx(0.9) and "momentum" in m.state_dict()
    m2 = build_method(
        "byol",
        build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.125),
        hidden_dim=32,
        out_dim=16,
        base_momentum=0.9,
    )
    check_trains(m2, size=16)
    assert float(m2.momentum) == pytest.approx(1.0)  # end of the 8-step schedule
    with pytest.raises(ValueError, match="momentum"):
        build_method("byol", enc, base_momentum=1.5)
