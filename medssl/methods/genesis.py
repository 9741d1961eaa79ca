"""Models Genesis (Zhou et al. 2019/2021, "Models Genesis", arXiv:1908.06912): restore the original
volume from a distorted one (non-linear intensity, local shuffling, in/out-painting) with a U-Net."""

from __future__ import annotations

import torch

from medssl.losses.restoration import RestorationLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import UNetEncoder

__all__ = ["ModelsGenesis"]


class ModelsGenesis(SSLMethod):
    """``UNetEncoder.reconstruct(view1)`` regressed onto ``view1_target`` (the undistorted view).

    Args:
        encoder: a :class:`UNetEncoder` (``out_channels == in_channels``).
        kind: ``"l2"`` (paper: MSE) or ``"l1"``.
        region: ``"all"`` (paper) or ``"masked"`` (only where ``view1_mask`` is 1).
    """

    name = "genesis"
    required_keys = frozenset({"view1", "view1_target"})

    def __init__(self, encoder: UNetEncoder, kind: str = "l2", region: str = "all") -> None:
        super().__init__(encoder)
        if not isinstance(encoder, UNetEncoder):
            raise ValueError(f"genesis needs the 'unet' encoder (encoder-decoder), got {encoder.name!r}")
        self.criterion = RestorationLoss(kind, region)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch, {"view1_mask"} if self.criterion.region == "masked" else set())
        pred = self.encoder.reconstruct(batch["view1"])  # (B, C, D, H, W)
        loss = self.criterion(pred, batch["view1_target"], batch.get("view1_mask"))
        return {"loss": loss, "restoration": loss.detach()}
