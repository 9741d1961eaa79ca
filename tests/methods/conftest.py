"""Helpers for method tests: contract batches and a tiny training loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from medssl.methods.base import SSLMethod


def _make_batch(
    b: int = 4, size: int = 16, c: int = 1, n_rot: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch with every key of the SSL batch contract (docs/CONTRACTS.md), random but seeded."""
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for v in ("view1", "view2"):
        target = torch.randn(b, c, size, size, size, generator=g)
        mask = (torch.rand(b, 1, size, size, size, generator=g) < 0.3).float()
        batch[v] = target * (1 - mask)  # masked voxels zeroed, as an inpainting transform would
        batch[f"{v}_target"] = target
        batch[f"{v}_mask"] = mask
        batch[f"{v}_rot"] = torch.randint(0, n_rot, (b,), generator=g)
    return batch


def _train(method: SSLMethod, batches: list[dict[str, torch.Tensor]], lr: float = 1e-3) -> list[float]:
    """One optimizer step per batch, calling the engine hook; returns the losses (before each step)."""
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    method.train()
    for step, batch in enumerate(batches, start=1):
        out = method(batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        logs = {k: v for k, v in out.items() if k != "loss"}
        assert logs and all(not v.requires_grad and v.numel() == 1 for v in logs.values())  # float()-able
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.on_step_end(step, len(batches))
        losses.append(float(out["loss"].detach()))
    return losses


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    return _make_batch


@pytest.fixture
def check_trains() -> Callable[..., list[float]]:
    """3 steps on fresh random batches, then overfit one fixed batch: the loss must fall."""

    def run(
        method: SSLMethod, size: int, b: int = 4, overfit_steps: int = 8, lr: float = 1e-3
    ) -> list[float]:
        torch.manual_seed(0)
        enc = method.encoder
        _train(method, [_make_batch(b, size, seed=s) for s in range(3)], lr)
        fixed = _make_batch(b, size, seed=99)
        losses = _train(method, [fixed] * overfit_steps, lr)
        assert losses[-1] < losses[0], f"{method.name}: loss did not fall on a fixed batch: {losses}"
        assert method.encoder is enc  # the transferred module is the trained one
        return losses

    return run
