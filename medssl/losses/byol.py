"""BYOL regression loss (Grill et al. 2020, arXiv:2006.07733): normalised MSE = 2 - 2 cos(p, z)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.precision import at_least_fp32

__all__ = ["BYOLLoss"]


class BYOLLoss(nn.Module):
    """Mean over the batch of ``|p/|p| - z/|z||² = 2 - 2 cos(p, z)``, in ``[0, 4]``.

    ``p`` is the online prediction, ``z`` the target projection; the caller passes ``z`` without
    gradient (BYOL's stop-gradient) and symmetrises over the two views.
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``p, z: (B, E)`` → scalar."""
        if p.ndim != 2 or p.shape != z.shape:
            raise ValueError(
                f"BYOLLoss expects two (B, E) tensors of equal shape, got {tuple(p.shape)}, {tuple(z.shape)}"
            )
        # fp32 even under autocast: the loss is a small difference of numbers close to 2
        p, z = at_least_fp32(p, z)
        return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
