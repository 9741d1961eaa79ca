"""VICReg: variance-invariance-covariance regularisation (Bardes et al. 2022, arXiv:2105.04906)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.distributed import dist_ready, gather_with_grad
from medssl.losses.precision import at_least_fp32

__all__ = ["VICRegLoss"]


def _off_diagonal_sq_sum(c: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries of a square matrix ``(E, E)``."""
    return c.pow(2).sum() - c.diagonal().pow(2).sum()


class VICRegLoss(nn.Module):
    """``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance`` on ``(B, E)`` embeddings.

    - invariance: ``mse(z1, z2)``;
    - variance: ``mean_e relu(gamma - sqrt(var_e + eps))``, averaged over the two branches;
    - covariance: ``sum_{e != f} C_ef² / E`` per branch (``C`` the ``(E, E)`` covariance), summed.

    Args:
        sim_coeff, std_coeff, cov_coeff: weights (paper: 25, 25, 1), all ``>= 0``.
        gamma: target standard deviation (paper: 1).
        eps: numerical stabiliser inside the sqrt.
        gather_distributed: compute variance/covariance over the global batch (as the official code);
            needs an initialised process group when called.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if min(sim_coeff, std_coeff, cov_coeff) < 0:
            raise ValueError("VICReg coefficients must be >= 0")
        if not (gamma > 0 and eps > 0):
            raise ValueError(f"gamma and eps must be > 0, got {gamma}, {eps}")
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.gamma, self.eps = float(gamma), float(eps)
        self.gather_distributed = bool(gather_distributed)

    def terms(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three unweighted terms ``{"invariance", "variance", "covariance"}`` (scalars)."""
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"VICRegLoss expects two (B, E) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
            )
        if self.gather_distributed:
            if not dist_ready():
                raise ValueError(
                    "VICRegLoss(gather_distributed=True) called without an initialised process group"
                )
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, E)
        z1, z2 = at_least_fp32(z1, z2)  # covariance in fp32 even under autocast
        n, e = z1.shape
        if n < 2:
            raise ValueError("VICRegLoss needs at least 2 samples for the variance term")
        inv = F.mse_loss(z1, z2)
        var = z1.new_zeros(())
        cov = z1.new_zeros(())
        for z in (z1, z2):
            zc = z - z.mean(dim=0)  # (N, E) centred
            std = torch.sqrt(zc.var(dim=0) + self.eps)  # (E,)
            var = var + F.relu(self.gamma - std).mean() / 2
            with torch.autocast(zc.device.type, enabled=False):  # fp32 covariance matmul
                c = zc.T @ zc / (n - 1)  # (E, E) covariance
            cov = cov + _off_diagonal_sq_sum(c) / e
        return {"invariance": inv, "variance": var, "covariance": cov}

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``z1, z2: (B, E)`` → weighted scalar loss."""
        t = self.terms(z1, z2)
        return (
            self.sim_coeff * t["invariance"]
            + self.std_coeff * t["variance"]
            + self.cov_coeff * t["covariance"]
        )
