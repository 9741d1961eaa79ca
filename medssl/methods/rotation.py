"""Rotation prediction (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
Rotations", arXiv:1803.07728), in 3D: classify which of R rotations the transform applied to ``view1``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.methods.base import SSLMethod
from medssl.networks.encoders import Encoder
from medssl.networks.heads import ProjectionHead

__all__ = ["RotationPrediction"]


class RotationPrediction(SSLMethod):
    """Cross entropy of a rotation classifier on the encoder's global feature.

    Args:
        encoder: any :class:`Encoder`.
        n_rotations: number of rotation classes ``R`` produced by the transform (``view1_rot`` in ``[0, R)``).
        hidden_dim: hidden width of the classifier MLP; 0 for a linear classifier.
    """

    name = "rotation"
    required_keys = frozenset({"view1", "view1_rot"})

    def __init__(self, encoder: Encoder, n_rotations: int = 4, hidden_dim: int = 0) -> None:
        super().__init__(encoder)
        if n_rotations < 2:
            raise ValueError(f"n_rotations must be >= 2, got {n_rotations}")
        d = encoder.feature_dim
        blocks = [(d, n_rotations, None, None)]
        if hidden_dim > 0:
            blocks = [(d, hidden_dim, "batch", "relu"), (hidden_dim, n_rotations, None, None)]
        self.head = ProjectionHead(blocks)
        self.n_rotations = n_rotations

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        rot = batch["view1_rot"].long().view(-1)  # (B,)
        logits = self.head(self.encoder(batch["view1"]))  # (B, R)
        loss = F.cross_entropy(logits, rot)
        acc = (logits.argmax(dim=1) == rot).float().mean().detach()
        return {"loss": loss, "rotation_ce": loss.detach(), "rotation_acc": acc}
