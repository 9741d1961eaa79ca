"""Restoration loss for inpainting / MAE / Models Genesis: L1 or L2 on the masked region or everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.losses.precision import at_least_fp32

__all__ = ["RestorationLoss"]

_ELEMENTWISE = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


class RestorationLoss(nn.Module):
    """Voxel-wise reconstruction loss.

    With ``region="all"`` (or no mask) it is torch's ``l1_loss``/``mse_loss`` (mean). With
    ``region="masked"`` it is the mean over masked elements only: ``sum(err * m) / sum(m)`` where
    ``m`` is the mask broadcast to ``pred``'s shape, e.g. ``(B, 1, D, H, W)`` over ``(B, C, D, H, W)``,
    or ``(B, N, 1)`` patch masks over ``(B, N, P)`` patch tokens (MAE). A batch without any masked
    element gives ``0`` (still attached to the graph).

    Args:
        kind: ``"l1"``, ``"l2"`` or ``"smooth_l1"``.
        region: ``"masked"`` or ``"all"``.
    """

    def __init__(self, kind: str = "l1", region: str = "masked") -> None:
        super().__init__()
        if kind not in _ELEMENTWISE:
            raise ValueError(f"kind must be one of {sorted(_ELEMENTWISE)}, got {kind!r}")
        if region not in ("masked", "all"):
            raise ValueError(f"region must be 'masked' or 'all', got {region!r}")
        self.kind, self.region = kind, region

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pred, target`` of equal shape, ``mask`` broadcastable to it (1 = masked) → scalar."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        fn = _ELEMENTWISE[self.kind]
        pred, target = at_least_fp32(pred, target)  # fp32 even under autocast
        if self.region == "all":
            return fn(pred, target)
        if mask is None:
            raise ValueError("RestorationLoss(region='masked') needs a mask")
        m = mask.to(pred.dtype).expand_as(pred)  # (same as pred)
        err = fn(pred, target, reduction="none")  # (same as pred)
        return (err * m).sum() / m.sum().clamp_min(1.0)
