"""TripletViewLoss against a naive per-triplet loop, for every mining mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.losses import TripletViewLoss


def _naive_direction(a: torch.Tensor, c: torch.Tensor, margin: float, mining: str) -> float:
    b = a.shape[0]
    per_anchor = []
    all_terms = []
    for i in range(b):
        d_pos = float((a[i] - c[i]).norm())
        negs = [float((a[i] - c[j]).norm()) for j in range(b) if j != i]
        all_terms += [max(0.0, d_pos - dn + margin) for dn in negs]
        if mining == "hard":
            dn = min(negs)
        elif mining == "semihard":
            semi = [x for x in negs if x > d_pos]
            dn = min(semi) if semi else max(negs)
        else:
            continue
        per_anchor.append(max(0.0, d_pos - dn + margin))
    return sum(all_terms) / len(all_terms) if mining == "all" else sum(per_anchor) / b


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_matches_loop_reference(mining: str) -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(7, 4, generator=g).double(), torch.randn(7, 4, generator=g).double()
    loss = TripletViewLoss(margin=0.5, mining=mining)(z1, z2)
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    ref = 0.5 * (_naive_direction(n1, n2, 0.5, mining) + _naive_direction(n2, n1, 0.5, mining))
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert loss.item() == pytest.approx(TripletViewLoss(margin=0.5, mining=mining)(z2, z1).item(), rel=1e-12)


def test_semihard_exercises_both_branches() -> None:
    # anchor 0: positive far, every negative closer → fallback (farthest negative); anchor 1: a semihard one exists
    a = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[20.0, 0.0], [10.0, 0.5], [0.0, 1.0]])
    loss = TripletViewLoss(margin=1.0, mining="semihard", normalize=False)._one_direction(a, c)
    assert loss.item() == pytest.approx(_naive_direction(a, c, 1.0, "semihard"), rel=1e-6)


def test_analytic_and_grad() -> None:
    # identical views of orthonormal volumes: d_pos = 0, d_neg = sqrt(2) > margin → zero loss
    e = torch.eye(4)
    assert TripletViewLoss(margin=0.5)(e, e).item() == pytest.approx(0.0, abs=1e-5)
    # all embeddings equal → every distance ~0 → loss = margin
    same = torch.ones(4, 3)
    assert TripletViewLoss(margin=0.3)(same, same).item() == pytest.approx(0.3, abs=1e-5)
    z1 = torch.randn(5, 6, requires_grad=True)
    z2 = torch.randn(5, 6)
    TripletViewLoss(margin=1.0)(z1, z2).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="margin"):
        TripletViewLoss(margin=0)
    with pytest.raises(ValueError, match="mining"):
        TripletViewLoss(mining="easy")
    with pytest.raises(ValueError, match="B >= 2"):
        TripletViewLoss()(torch.randn(1, 3), torch.randn(1, 3))
