"""Triplet loss on two views with in-batch negative mining (FaceNet, Schroff et al. 2015, arXiv:1503.03832).

Anchor and positive are two views of one volume; the negatives are the other volumes of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.precision import at_least_fp32

__all__ = ["TripletViewLoss", "MINING"]

MINING = ("hard", "semihard", "all")


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(B, E), (B, E)`` → ``(B, B)``; the sqrt is clamped so d=0 has a finite gradient."""
    sq = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]  # |a_i - b_j|²: (B, B)
    return sq.clamp_min(1e-12).sqrt()


class TripletViewLoss(nn.Module):
    """``max(0, d(a, p) - d(a, n) + margin)`` with anchors from one view and positives from the other.

    Both directions (view1 anchors vs view2 candidates, and the reverse) are averaged, so the loss is
    symmetric: ``loss(z1, z2) == loss(z2, z1)``. For anchor ``i`` the candidates are the other view's
    embeddings ``j``; ``j == i`` is the positive, ``j != i`` the negatives.

    Args:
        margin: margin ``> 0`` in embedding distance units (embeddings are L2-normalised when
            ``normalize``, so distances lie in ``[0, 2]``).
        mining: ``"hard"``: the closest negative per anchor; ``"semihard"``: the closest negative farther
            than the positive (FaceNet; when none exists, the farthest negative, as TF-Addons does);
            ``"all"``: mean over all ``B(B-1)`` triplets.
        normalize: L2-normalise the embeddings first.
    """

    def __init__(self, margin: float = 0.2, mining: str = "hard", normalize: bool = True) -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
        self.margin = float(margin)
        self.mining = mining
        self.normalize = bool(normalize)

    def _one_direction(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = _pairwise_dist(a, c)  # (B, B): d[i, j] = |a_i - c_j|
        b = d.shape[0]
        eye = torch.eye(b, dtype=torch.bool, device=d.device)
        d_pos = d.diagonal()[:, None]  # (B, 1)
        if self.mining == "all":
            return F.relu(d_pos - d + self.margin)[~eye].mean()
        inf = torch.finfo(d.dtype).max
        if self.mining == "hard":
            d_neg = d.masked_fill(eye, inf).min(dim=1).values  # (B,)
        else:  # semihard
            outside = (d > d_pos) & ~eye  # negatives farther than the positive
            d_semi = d.masked_fill(~outside, inf).min(dim=1).values  # (B,)
            d_far = d.masked_fill(eye, -inf).max(dim=1).values  # (B,)
            d_neg = torch.where(outside.any(dim=1), d_semi, d_far)
        return F.relu(d_pos.squeeze(1) - d_neg + self.margin).mean()

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``z1, z2: (B, E)`` with row i of both from the same volume, ``B >= 2`` → scalar."""
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"TripletViewLoss expects two (B, E) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
            )
        if z1.shape[0] < 2:
            raise ValueError(
                "TripletViewLoss needs B >= 2 (the negatives are the other volumes of the batch)"
            )
        z1, z2 = at_least_fp32(z1, z2)  # distances in fp32 even under autocast
        if self.normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        with torch.autocast(z1.device.type, enabled=False):  # keep the distance matmuls in fp32
            return 0.5 * (self._one_direction(z1, z2) + self._one_direction(z2, z1))
