"""RestorationLoss: masked mean vs a loop, whole-volume = torch, patch-token masks, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.losses import RestorationLoss


def test_masked_matches_loop() -> None:
    g = torch.Generator().manual_seed(6)
    pred, tgt = torch.randn(2, 2, 3, 3, 3, generator=g), torch.randn(2, 2, 3, 3, 3, generator=g)
    mask = (torch.rand(2, 1, 3, 3, 3, generator=g) > 0.5).float()
    for kind, f in (("l1", lambda a, b: abs(a - b)), ("l2", lambda a, b: (a - b) ** 2)):
        num = den = 0.0
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in pred.shape]).tolist():
            b, c, x, y, z = idx
            if mask[b, 0, x, y, z] > 0:
                num += float(f(pred[b, c, x, y, z], tgt[b, c, x, y, z]))
                den += 1
        assert RestorationLoss(kind, "masked")(pred, tgt, mask).item() == pytest.approx(num / den, rel=1e-5)


def test_all_region_and_patch_masks() -> None:
    pred, tgt = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    assert RestorationLoss("l2", "all")(pred, tgt).item() == pytest.approx(F.mse_loss(pred, tgt).item())
    assert RestorationLoss("l1", "masked")(pred, tgt, torch.ones(2, 1, 4, 4, 4)).item() == pytest.approx(
        F.l1_loss(pred, tgt).item(), rel=1e-6
    )
    tokens_p, tokens_t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # (B, N, P)
    m = torch.zeros(2, 5, 1)
    m[:, 1] = 1
    got = RestorationLoss("l2", "masked")(tokens_p, tokens_t, m).item()
    assert got == pytest.approx(F.mse_loss(tokens_p[:, 1], tokens_t[:, 1]).item(), rel=1e-6)
    p = pred.clone().requires_grad_(True)
    zero = RestorationLoss()(p, tgt, torch.zeros(2, 1, 4, 4, 4))
    zero.backward()
    assert zero.item() == 0.0 and p.grad is not None


def test_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        RestorationLoss("l3")
    with pytest.raises(ValueError, match="needs a mask"):
        RestorationLoss()(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        RestorationLoss()(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3), torch.ones(1, 1, 2, 2, 2))
