"""VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", arXiv:2105.04906): a non-contrastive method, no negatives and no momentum encoder."""

from __future__ import annotations

import torch

from medssl.losses.vicreg import VICRegLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import Encoder
from medssl.networks.heads import vicreg_expander

__all__ = ["VICReg"]


class VICReg(SSLMethod):
    """Encoder → expander → :class:`VICRegLoss` on ``view1``/``view2``.

    Args:
        encoder: any :class:`Encoder`.
        hidden_dim, out_dim: expander sizes (paper: 8192, 8192).
        sim_coeff, std_coeff, cov_coeff: loss weights (paper: 25, 25, 1).
        gather_distributed: variance/covariance over the global batch.
    """

    name = "vicreg"
    required_keys = frozenset({"view1", "view2"})

    def __init__(
        self,
        encoder: Encoder,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(encoder)
        self.expander = vicreg_expander(encoder.feature_dim, hidden_dim, out_dim)
        self.criterion = VICRegLoss(sim_coeff, std_coeff, cov_coeff, gather_distributed=gather_distributed)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        z1 = self.expander(self.encoder(batch["view1"]))  # (B, out_dim); separate passes: BN per branch
        z2 = self.expander(self.encoder(batch["view2"]))
        t = self.criterion.terms(z1, z2)
        c = self.criterion
        loss = c.sim_coeff * t["invariance"] + c.std_coeff * t["variance"] + c.cov_coeff * t["covariance"]
        return {"loss": loss} | {k: v.detach() for k, v in t.items()}
