"""Triplet-loss pretraining on views: anchor/positive = two views of one volume, negatives = the other
volumes of the batch, mined in-batch (FaceNet, Schroff et al. 2015, arXiv:1503.03832)."""

from __future__ import annotations

import torch

from medssl.losses.triplet import TripletViewLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import Encoder
from medssl.networks.heads import simclr_projection

__all__ = ["TripletView"]


class TripletView(SSLMethod):
    """Encoder → projection MLP → :class:`TripletViewLoss` on ``view1``/``view2`` (B >= 2).

    Args:
        encoder: any :class:`Encoder`.
        hidden_dim, out_dim: projection MLP sizes.
        margin: triplet margin on L2-normalised embeddings.
        mining: ``"hard"``, ``"semihard"`` or ``"all"``.
    """

    name = "triplet"
    required_keys = frozenset({"view1", "view2"})

    def __init__(
        self,
        encoder: Encoder,
        hidden_dim: int = 512,
        out_dim: int = 128,
        margin: float = 0.2,
        mining: str = "hard",
    ) -> None:
        super().__init__(encoder)
        self.projector = simclr_projection(encoder.feature_dim, hidden_dim, out_dim)
        self.criterion = TripletViewLoss(margin=margin, mining=mining)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        z = self.projector(self.encoder(torch.cat([batch["view1"], batch["view2"]])))  # (2B, out_dim)
        z1, z2 = z.chunk(2)
        loss = self.criterion(z1, z2)
        return {"loss": loss, "triplet": loss.detach()}
