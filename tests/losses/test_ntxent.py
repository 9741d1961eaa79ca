"""NT-Xent: loop reference, analytic values, MONAI agreement, and 2-rank gloo gather == single process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.losses import ContrastiveLoss

from medssl.losses import NTXentLoss, VICRegLoss


def _naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    z = torch.cat([z1, z2]).double()
    b = z1.shape[0]
    total = 0.0
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        sims = [torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / t for k in range(2 * b)]
        denom = sum(math.exp(float(s)) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(float(sims[pos])) / denom)
    return torch.tensor(total / (2 * b))


def test_matches_loop_reference_and_monai() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = NTXentLoss(temperature=0.3)(z1, z2)
    assert loss.item() == pytest.approx(_naive_ntxent(z1, z2, 0.3).item(), rel=1e-5)
    assert loss.item() == pytest.approx(ContrastiveLoss(temperature=0.3)(z1, z2).item(), rel=1e-5)
    assert loss.item() == pytest.approx(NTXentLoss(temperature=0.3)(z2, z1).item(), rel=1e-6)  # symmetric


def test_analytic_values() -> None:
    b, t = 4, 0.5
    e = torch.eye(b) * 3.0  # mutually orthogonal volumes, any scale (cosine)
    aligned = NTXentLoss(temperature=t)(e, e).item()
    assert aligned == pytest.approx(math.log(1 + (2 * b - 2) * math.exp(-1 / t)), rel=1e-6)
    # orthogonal views, all 2B embeddings orthogonal: every logit is 0 → log(2B - 1)
    e8 = torch.eye(2 * b)
    ortho = NTXentLoss(temperature=t)(e8[:b], e8[b:]).item()
    assert ortho == pytest.approx(math.log(2 * b - 1), rel=1e-6)


def test_stable_at_low_temperature_and_grad_flows() -> None:
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 16, generator=g, requires_grad=True)
    z2 = torch.randn(8, 16, generator=g, requires_grad=True)
    loss = NTXentLoss(temperature=0.01)(z1, z2)
    loss.backward()
    assert torch.isfinite(loss)
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="process group"):
        NTXentLoss(gather_distributed=True)(torch.randn(4, 3), torch.randn(4, 3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        res = {}
        for name, loss_fn in (
            ("ntxent", NTXentLoss(0.2, gather_distributed=True)),
            ("vicreg", VICRegLoss(gather_distributed=True)),
        ):
            a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
            a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
            loss = loss_fn(a1, a2)
            loss.backward()
            res[name] = {"loss": loss.detach(), "g1": a1.grad, "g2": a2.grad}
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_two_ranks_equals_single_process(tmp_path) -> None:
    """NT-Xent (and VICReg) gathered over 2 gloo ranks x B == single process on the 2B batch."""
    world, b = 2, 3
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(world * b, 8, generator=g), torch.randn(world * b, 8, generator=g)
    mp.spawn(_worker, args=(world, _free_port(), z1, z2, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for name, loss_fn in (("ntxent", NTXentLoss(temperature=0.2)), ("vicreg", VICRegLoss())):
        res = [r[name] for r in ranks]
        s1, s2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        ref = loss_fn(s1, s2)
        ref.backward()
        # DDP averages the per-rank losses (and gradients) over ranks
        assert torch.stack([r["loss"] for r in res]).mean().item() == pytest.approx(ref.item(), rel=1e-6)
        g1 = torch.cat([r["g1"] for r in res]) / world
        g2 = torch.cat([r["g2"] for r in res]) / world
        torch.testing.assert_close(g1, s1.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g2, s2.grad, rtol=1e-5, atol=1e-7)
    # without gathering, each rank only sees its own negatives: a different (smaller-batch) loss
    local = NTXentLoss(temperature=0.2)(z1[:b], z2[:b]).item()
    assert ranks[0]["ntxent"]["loss"].item() != pytest.approx(local, rel=1e-6)


def test_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    ref = NTXentLoss(temperature=0.05)(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NTXentLoss(temperature=0.05)(z1.bfloat16(), z2.bfloat16())
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs remains: normalisation and the logits matmul run in fp32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
