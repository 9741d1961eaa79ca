"""Transformer encoders: the Swin transformer of ``SwinUNETR`` and the ``ViT`` of ``UNETR``.

See :mod:`medssl.networks.encoders` for the shared interface and the registry (``ENCODERS``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep

from medssl.networks.encoder_base import Encoder

__all__ = ["SwinViTEncoder", "ViTEncoder"]

logger = logging.getLogger(__name__)


class SwinViTEncoder(Encoder):
    """The Swin transformer of MONAI ``SwinUNETR`` (``SwinUNETR.swinViT``), built with the same arguments.

    ``kwargs`` are ``monai.networks.nets.swin_unetr.SwinTransformer`` arguments plus ``normalize``
    (SwinUNETR's flag for layer-normalising the hidden states). Maps: 5 stages with
    ``feature_size * (1, 2, 4, 8, 16)`` channels at strides ``patch_size * (1, 2, 4, 8, 16)``; input
    sides must be divisible by ``patch_size ** 5`` (32 for the default patch 2).
    """

    name = "swinvit"
    monai_class = "monai.networks.nets.swin_unetr.SwinTransformer"

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        k = dict(self.kwargs)
        self.normalize = bool(k.pop("normalize", True))
        self.net = SwinTransformer(**k)
        fs = int(k["embed_dim"])
        self.feature_channels = [fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.downstream = {"SwinUNETR": "swinViT."}
        # SwinUNETR argument name → SwinTransformer argument name (as SwinUNETR.__init__ maps them)
        names = dict(in_channels="in_chans", feature_size="embed_dim", dropout_path_rate="drop_path_rate")
        same = ("depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate")
        same += ("patch_norm", "use_checkpoint", "downsample", "use_v2")
        swin_unetr = {n: k[names.get(n, n)] for n in (*names, *same) if names.get(n, n) in k}
        swin_unetr |= {"patch_size": k["patch_size"][0], "normalize": self.normalize}
        self.downstream_kwargs = {"SwinUNETR": swin_unetr}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x, self.normalize)

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        feature_size: int = 48,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
        normalize: bool = True,
    ) -> SwinViTEncoder:
        """Build from ``SwinUNETR``'s argument names (mapped as SwinUNETR maps them)."""
        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be divisible by 12 (SwinUNETR), got {feature_size}")
        sizes = dict(
            in_chans=in_channels, embed_dim=feature_size, depths=tuple(depths), num_heads=tuple(num_heads)
        )
        windows = dict(
            window_size=ensure_tuple_rep(window_size, 3), patch_size=ensure_tuple_rep(patch_size, 3)
        )
        drops = dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=dropout_path_rate)
        rest = dict(
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_norm=patch_norm, use_checkpoint=use_checkpoint
        )
        rest |= dict(spatial_dims=3, downsample=downsample, use_v2=use_v2, normalize=normalize)
        kwargs = sizes | windows | drops | rest
        return cls(kwargs, img_size)


class ViTEncoder(Encoder):
    """MONAI ``ViT`` as used by ``UNETR.vit`` (UNETR fixes ``patch_size=16`` and ``num_layers=12``).

    Maps: the tokens of blocks ``L/4, L/2, 3L/4`` and the final normalised tokens, each reshaped to
    ``(B, hidden_size, D/p, H/p, W/p)``. The global feature is the mean of the final tokens.
    """

    name = "vit"
    monai_class = "monai.networks.nets.ViT"

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        self.net = ViT(**self.kwargs)
        k = self.kwargs
        self.patch_size = tuple(ensure_tuple_rep(k["patch_size"], 3))
        self.grid = tuple(
            int(i) // int(p) for i, p in zip(ensure_tuple_rep(k["img_size"], 3), self.patch_size, strict=True)
        )
        n_layers = int(k["num_layers"])
        self.feature_layers = sorted({min(n_layers - 1, n_layers * q // 4) for q in (1, 2, 3)})
        self.feature_channels = [int(k["hidden_size"])] * (len(self.feature_layers) + 1)
        self.downstream = {"ViT": ""}
        if self.patch_size == (16, 16, 16) and n_layers == 12 and not k.get("classification", False):
            self.downstream["UNETR"] = "vit."
            self.downstream_kwargs["UNETR"] = {
                key: k[key]
                for key in ("in_channels", "img_size", "hidden_size", "mlp_dim", "num_heads", "proj_type")
            } | {"dropout_rate": k.get("dropout_rate", 0.0), "qkv_bias": k.get("qkv_bias", False)}
        else:
            logger.info(
                "ViT encoder with patch %s / %d layers cannot transfer to UNETR", self.patch_size, n_layers
            )

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C, D, H, W)`` → final normalised tokens ``(B, N, hidden)`` and each block's tokens."""
        return self.net(x)

    def _to_map(self, t: torch.Tensor) -> torch.Tensor:
        # t: (B, N, E) → (B, E, d, h, w) with N = d*h*w (patch grid)
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        final, hidden = self.tokens(x)
        return [self._to_map(hidden[i]) for i in self.feature_layers] + [self._to_map(final)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0].mean(dim=1)  # (B, N, E) → (B, E)

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> ViTEncoder:
        """Build with ``UNETR``'s defaults; sides of ``img_size`` must be multiples of ``patch_size``."""
        img = ensure_tuple_rep(img_size, 3)
        if any(int(s) % int(patch_size) for s in img):
            raise ValueError(f"img_size {img} must be a multiple of patch_size {patch_size}")
        kwargs = dict(in_channels=in_channels, img_size=img)
        kwargs |= dict(patch_size=ensure_tuple_rep(patch_size, 3), hidden_size=hidden_size)
        kwargs |= dict(mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type=proj_type)
        kwargs |= dict(classification=False, dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias)
        return cls(kwargs, img)
