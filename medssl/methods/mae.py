"""Masked autoencoder for volumes (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377) with the MONAI ``ViT`` encoder: encode only the visible patches, decode all patches with
a light transformer, loss on the masked patches.

Why not ``monai.networks.nets.MaskedAutoEncoderViT``: its encoder keys (``blocks.<L>`` final norm,
``cls_token``) differ from ``ViT``/``UNETR.vit``, so its weights would not transfer into UNETR; here the
encoder *is* the ``ViT`` that :class:`ViTEncoder` wraps, and only the decoder belongs to the method.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn

from medssl.losses.restoration import RestorationLoss
from medssl.methods.base import SSLMethod
from medssl.networks.encoders import ViTEncoder

__all__ = ["MAE", "patchify"]


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` → ``(B, N, C·pd·ph·pw)`` in the token order of MONAI's conv patch embedding."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch
    x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (d // pd) * (h // ph) * (w // pw), c * pd * ph * pw)


class MAE(SSLMethod):
    """MAE on ``view1`` (target: ``view1_target`` when present, else ``view1``).

    The method draws its own patch mask (a fixed count per sample, so visible tokens batch densely);
    feed it an unmasked ``view1`` (a transform-made cuboid mask in ``view1`` only adds corruption).

    Args:
        encoder: a :class:`ViTEncoder`.
        mask_ratio: fraction of patches hidden from the encoder, in ``(0, 1)`` (paper: 0.75).
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer.
        norm_pix_loss: regress per-patch normalised voxels (paper's best setting).

    Masks are drawn from torch's global RNG, so ``torch.manual_seed`` and the engine's checkpointed RNG
    state make them reproducible (exact resume).
    """

    name = "mae"
    required_keys = frozenset({"view1"})

    def __init__(
        self,
        encoder: ViTEncoder,
        mask_ratio: float = 0.75,
        decoder_dim: int = 192,
        decoder_depth: int = 2,
        decoder_heads: int = 6,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__(encoder)
        if not isinstance(encoder, ViTEncoder):
            raise ValueError(f"mae needs the 'vit' encoder, got {encoder.name!r}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        n = encoder.grid[0] * encoder.grid[1] * encoder.grid[2]
        p = (
            encoder.kwargs["in_channels"]
            * encoder.patch_size[0]
            * encoder.patch_size[1]
            * encoder.patch_size[2]
        )
        self.n_keep = max(1, int(round(n * (1 - mask_ratio))))
        e = int(encoder.kwargs["hidden_size"])
        self.decoder_embed = nn.Linear(e, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            *[
                TransformerBlock(decoder_dim, 4 * decoder_dim, decoder_heads, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p)
        self.criterion = RestorationLoss("l2", "masked")

    def random_masking(self, b: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample random permutation: ``keep`` indices ``(B, n_keep)`` and ``mask`` ``(B, N)`` (1 = hidden)."""
        noise = torch.rand(b, n, device=device)  # (B, N)
        keep = noise.argsort(dim=1)[:, : self.n_keep]  # (B, n_keep)
        mask = torch.ones(b, n, device=device)
        mask.scatter_(1, keep, 0.0)
        return keep, mask

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        x = batch["view1"]
        vit = self.encoder.net
        tokens = vit.patch_embedding(x)  # (B, N, E), position embedding added
        b, n, e = tokens.shape
        keep, mask = self.random_masking(b, n, x.device)
        v = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, e))  # visible: (B, n_keep, E)
        for blk in vit.blocks:
            v = blk(v)
        v = self.decoder_embed(vit.norm(v))  # (B, n_keep, Dd)
        full = self.mask_token.to(v.dtype).expand(b, n, -1).clone()  # (B, N, Dd)
        full = full.scatter(1, keep[..., None].expand(-1, -1, v.shape[2]), v) + self.decoder_pos.to(v.dtype)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(full)))  # (B, N, P)
        target = patchify(batch.get("view1_target", x), self.encoder.patch_size)  # (B, N, P)
        if self.norm_pix_loss:
            mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mu) / (var + 1e-6).sqrt()
        loss = self.criterion(pred, target, mask[..., None])
        return {"loss": loss, "mae_mse": loss.detach()}
