"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv:2006.07733): an online network predicts a
momentum (EMA) target network's projection of the other view; no negatives.

The EMA update runs in :meth:`BYOL.on_step_end`, which the engine calls after each optimizer step; the
momentum follows BYOL's cosine schedule from ``base_momentum`` to ``final_momentum``.
"""

from __future__ import annotations

import copy
import math

import torch

from medssl.losses.byol import BYOLLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import Encoder
from medssl.networks.heads import byol_predictor, byol_projection

__all__ = ["BYOL", "byol_momentum"]


def byol_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """``final - (final - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, ``final`` at the end."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * frac) + 1) / 2


class BYOL(SSLMethod):
    """Online ``encoder → projector → predictor`` vs. EMA target ``encoder → projector``, symmetrised.

    Args:
        encoder: any :class:`Encoder` (the online encoder, the one transferred).
        hidden_dim, out_dim: projector/predictor sizes (paper: 4096, 256).
        base_momentum, final_momentum: EMA schedule (paper: 0.996 → 1).
    """

    name = "byol"
    required_keys = frozenset({"view1", "view2"})

    def __init__(
        self,
        encoder: Encoder,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__(encoder)
        if not 0 <= base_momentum <= final_momentum <= 1:
            raise ValueError(
                f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}"
            )
        self.projector = byol_projection(encoder.feature_dim, hidden_dim, out_dim)
        self.predictor = byol_predictor(out_dim, hidden_dim, out_dim)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_momentum, self.final_momentum = float(base_momentum), float(final_momentum)
        self.criterion = BYOLLoss()
        self.register_buffer(
            "momentum", torch.tensor(float(base_momentum))
        )  # in the state dict: exact resume

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        x = torch.cat([batch["view1"], batch["view2"]])  # (2B, C, D, H, W)
        p1, p2 = self.predictor(self.projector(self.encoder(x))).chunk(2)  # (B, out_dim) each
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_encoder(x)).chunk(2)
        loss = self.criterion(p1, z2) + self.criterion(p2, z1)  # each view predicts the other's target
        return {"loss": loss, "byol": loss.detach(), "momentum": self.momentum.detach().clone()}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA: ``target = m * target + (1 - m) * online`` with ``m = byol_momentum(step, total_steps)``."""
        m = byol_momentum(step, total_steps, self.base_momentum, self.final_momentum)
        self.momentum.fill_(m)
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.lerp_(po.detach(), 1.0 - m)
            for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                bt.copy_(bo)
