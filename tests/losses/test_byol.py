"""BYOLLoss: loop reference, analytic values, symmetry."""

from __future__ import annotations

import pytest
import torch

from medssl.losses import BYOLLoss


def test_matches_loop_reference_and_invariants() -> None:
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(5, 7, generator=g).double(), torch.randn(5, 7, generator=g).double()
    ref = sum(float(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()) for i in range(5)) / 5
    loss = BYOLLoss()
    assert loss(p, z).item() == pytest.approx(ref, rel=1e-9)
    assert loss(z, p).item() == pytest.approx(ref, rel=1e-12)
    assert loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-9)  # aligned → 0
    assert loss(p, -p).item() == pytest.approx(4.0, rel=1e-9)  # opposite → 4
    e = torch.eye(4)
    assert loss(e, e.roll(1, dims=1)).item() == pytest.approx(2.0, rel=1e-6)  # orthogonal → 2


def test_grad_and_validation() -> None:
    p = torch.randn(4, 3, requires_grad=True)
    BYOLLoss()(p, torch.randn(4, 3)).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shape"):
        BYOLLoss()(torch.randn(4, 3), torch.randn(4, 2))
