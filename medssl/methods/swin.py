"""SwinUNETR self-supervised pretraining (Tang et al. CVPR 2022, "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", arXiv:2111.14791): masked-volume inpainting + rotation
prediction + contrastive coding on two augmented views, weighted sum.

As in the reference code (``Pretrain/models/ssl_head.py``): reconstruction from the deepest Swin map by a
transposed-conv head, L1 on the whole volume, NT-Xent between the two views. Difference: the rotation and
contrastive heads read the mean-pooled deepest map instead of its first two tokens, which keeps them valid
for small crops (a 1×1×1 deepest map at 32³).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medssl.losses.ntxent import NTXentLoss
from medssl.losses.restoration import RestorationLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import SwinViTEncoder
from medssl.networks.heads import ProjectionHead, ReconstructionHead, rotation_head

__all__ = ["SwinPretrain"]


class SwinPretrain(SSLMethod):
    """``rot_weight * CE(rot) + contrast_weight * NT-Xent + recon_weight * L1(recon, target)``.

    Args:
        encoder: a :class:`SwinViTEncoder`.
        n_rotations: rotation classes ``R`` (paper: 4, rotations about one axis).
        contrast_dim: contrastive embedding size (paper: 512).
        temperature: NT-Xent temperature (paper: 0.5).
        rot_weight, contrast_weight, recon_weight: loss weights (paper: 1, 1, 1).
        recon_region: ``"all"`` (paper) or ``"masked"`` (needs ``view{1,2}_mask``).
        gather_distributed: contrastive negatives from all ranks.
    """

    name = "swin"
    required_keys = frozenset({"view1", "view2", "view1_target", "view2_target", "view1_rot", "view2_rot"})

    def __init__(
        self,
        encoder: SwinViTEncoder,
        n_rotations: int = 4,
        contrast_dim: int = 512,
        temperature: float = 0.5,
        rot_weight: float = 1.0,
        contrast_weight: float = 1.0,
        recon_weight: float = 1.0,
        recon_region: str = "all",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(encoder)
        if not isinstance(encoder, SwinViTEncoder):
            raise ValueError(f"swin needs the 'swinvit' encoder, got {encoder.name!r}")
        if min(rot_weight, contrast_weight, recon_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        d = encoder.feature_dim
        stride = int(encoder.kwargs["patch_size"][0]) * 16  # patch embedding, then 4 patch mergings
        self.rotation_head = rotation_head(d, n_rotations)
        self.contrastive_head = ProjectionHead([(d, contrast_dim, None, None)])
        self.recon_head = ReconstructionHead(d, int(encoder.kwargs["in_chans"]), int(math.log2(stride)))
        self.contrast = NTXentLoss(temperature, gather_distributed)
        self.recon = RestorationLoss("l1", recon_region)
        self.weights = (float(rot_weight), float(contrast_weight), float(recon_weight))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        extra = {"view1_mask", "view2_mask"} if self.recon.region == "masked" else set()
        self.check_batch(batch, extra)
        x = torch.cat([batch["view1"], batch["view2"]])  # (2B, C, D, H, W)
        deep = self.encoder.forward_features(x)[-1]  # (2B, 16·fs, D/32, H/32, W/32)
        g = deep.mean(dim=(2, 3, 4))  # (2B, 16·fs)
        rot = torch.cat([batch["view1_rot"], batch["view2_rot"]]).long().view(-1)  # (2B,)
        logits = self.rotation_head(g)  # (2B, R)
        loss_rot = F.cross_entropy(logits, rot)
        z1, z2 = self.contrastive_head(g).chunk(2)  # (B, contrast_dim) each
        loss_con = self.contrast(z1, z2)
        recon = self.recon_head(deep)  # (2B, C, D, H, W)
        target = torch.cat([batch["view1_target"], batch["view2_target"]])
        mask = torch.cat([batch["view1_mask"], batch["view2_mask"]]) if extra else None
        loss_rec = self.recon(recon, target, mask)
        w_rot, w_con, w_rec = self.weights
        loss = w_rot * loss_rot + w_con * loss_con + w_rec * loss_rec
        acc = (logits.argmax(dim=1) == rot).float().mean()
        return {
            "loss": loss,
            "rotation_ce": loss_rot.detach(),
            "contrastive": loss_con.detach(),
            "reconstruction_l1": loss_rec.detach(),
            "rotation_acc": acc.detach(),
        }
