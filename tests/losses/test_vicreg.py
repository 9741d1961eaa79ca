"""VICRegLoss against a loop-based reference and known values."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.losses import VICRegLoss


def _naive(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> tuple[float, float, float]:
    n, e = z1.shape
    inv = sum(float((z1[i, k] - z2[i, k]) ** 2) for i in range(n) for k in range(e)) / (n * e)
    var = cov = 0.0
    for z in (z1, z2):
        mu = [sum(float(z[i, k]) for i in range(n)) / n for k in range(e)]
        for k in range(e):
            v = sum((float(z[i, k]) - mu[k]) ** 2 for i in range(n)) / (n - 1)
            var += max(0.0, 1.0 - math.sqrt(v + eps)) / e / 2
        for k in range(e):
            for m in range(e):
                if k != m:
                    c = sum((float(z[i, k]) - mu[k]) * (float(z[i, m]) - mu[m]) for i in range(n)) / (n - 1)
                    cov += c * c / e
    return inv, var, cov


def test_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(4)
    z1, z2 = 0.5 * torch.randn(6, 4, generator=g).double(), 0.5 * torch.randn(6, 4, generator=g).double()
    loss_fn = VICRegLoss(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    t = loss_fn.terms(z1, z2)
    inv, var, cov = _naive(z1, z2)
    assert t["invariance"].item() == pytest.approx(inv, rel=1e-9)
    assert t["variance"].item() == pytest.approx(var, rel=1e-9)
    assert t["covariance"].item() == pytest.approx(cov, rel=1e-9)
    assert loss_fn(z1, z2).item() == pytest.approx(2 * inv + 3 * var + 0.5 * cov, rel=1e-9)
    assert loss_fn(z2, z1).item() == pytest.approx(loss_fn(z1, z2).item(), rel=1e-12)  # symmetric


def test_known_values_and_grad() -> None:
    # collapsed embeddings: variance term = relu(1 - sqrt(eps)) per branch/2 → 1 - 0.01; no covariance
    z = torch.ones(8, 5)
    t = VICRegLoss().terms(z, z)
    assert t["invariance"].item() == 0.0
    assert t["variance"].item() == pytest.approx(1 - 0.01, rel=1e-6)
    assert t["covariance"].item() == pytest.approx(0.0, abs=1e-9)
    z1 = torch.randn(8, 5, requires_grad=True)
    VICRegLoss()(z1, torch.randn(8, 5)).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        VICRegLoss(sim_coeff=-1)
    with pytest.raises(ValueError, match="at least 2"):
        VICRegLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="process group"):
        VICRegLoss(gather_distributed=True)(torch.randn(4, 3), torch.randn(4, 3))
