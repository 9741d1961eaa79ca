"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709): two views → encoder → projection MLP → NT-Xent over the (global) batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.losses.ntxent import NTXentLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import Encoder
from medssl.networks.heads import simclr_projection

__all__ = ["SimCLR"]


class SimCLR(SSLMethod):
    """SimCLR on ``view1``/``view2``.

    Args:
        encoder: any :class:`Encoder` (global feature ``(B, feature_dim)``).
        hidden_dim, out_dim: projection MLP sizes (paper: 2048, 128).
        temperature: NT-Xent temperature.
        gather_distributed: negatives from all ranks (needs an initialised process group).
    """

    name = "simclr"
    required_keys = frozenset({"view1", "view2"})

    def __init__(
        self,
        encoder: Encoder,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.1,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(encoder)
        self.projector = simclr_projection(encoder.feature_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature, gather_distributed)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        x = torch.cat([batch["view1"], batch["view2"]])  # (2B, C, D, H, W): one pass, shared BN stats
        z = self.projector(self.encoder(x))  # (2B, out_dim)
        z1, z2 = z.chunk(2)
        loss = self.criterion(z1, z2)
        pos = F.cosine_similarity(z1, z2, dim=1).mean().detach()
        return {"loss": loss, "ntxent": loss.detach(), "pos_cosine": pos}
