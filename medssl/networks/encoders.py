"""SSL encoders: MONAI networks wrapped with a uniform interface and a rebuildable recipe.

Every encoder holds the MONAI module it wraps as ``self.net`` and exposes

- ``forward(x)``: ``(B, C, D, H, W)`` → global feature ``(B, feature_dim)`` (mean over space / tokens);
- ``forward_features(x)``: multi-scale maps ``list[(B, C_i, D_i, H_i, W_i)]``, shallow → deep;
- ``feature_dim`` and ``feature_channels`` (channels of each map);
- ``recipe``: ``{"name", "class", "kwargs", "img_size", "downstream_kwargs"}``, JSON-serialisable,
  everything :func:`rebuild_encoder` needs (checkpoints embed it);
- ``downstream``: downstream MONAI class name → key prefix of the encoder weights in that network,
  and ``export_state_dict(target)`` giving the keys exactly as that network names them.

``downstream_kwargs`` in the recipe holds, per downstream class, the constructor arguments that make
its encoder part identical to this encoder (the task-specific ones, e.g. ``out_channels``, are left
to the caller), so ``networks/transfer.py`` can build a matching downstream net.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from monai.networks.nets import BasicUNet, ResNet, SegResNet, ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = [
    "Encoder",
    "SwinViTEncoder",
    "ViTEncoder",
    "SegResNetEncoder",
    "ResNetEncoder",
    "UNetEncoder",
    "ENCODERS",
    "build_encoder",
    "rebuild_encoder",
]

logger = logging.getLogger(__name__)

_RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def _jsonable(v: Any) -> Any:
    """Tuples → lists (recursively) so a recipe survives a JSON round trip unchanged."""
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class Encoder(nn.Module):
    """Base class: a MONAI network ``net`` plus the metadata needed to transfer its weights.

    Subclasses build ``self.net`` from the MONAI constructor arguments ``kwargs`` and implement
    :meth:`forward_features`.

    Args:
        kwargs: constructor arguments of the wrapped MONAI class (JSON-serialisable).
        img_size: training crop size ``(D, H, W)`` in voxels, recorded in the recipe.
    """

    name: str = ""
    monai_class: str = ""
    exclude_prefixes: tuple[str, ...] = ()  # keys of ``net`` that are not encoder weights

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.kwargs = _jsonable(dict(kwargs))
        self.img_size = tuple(int(s) for s in ensure_tuple_rep(img_size, 3))
        self.feature_channels: list[int] = []
        self.downstream: dict[str, str] = {}
        self.downstream_kwargs: dict[str, dict[str, Any]] = {}

    @property
    def feature_dim(self) -> int:
        """Size of the global feature returned by :meth:`forward`."""
        return self.feature_channels[-1]

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder: ``rebuild_encoder(enc.recipe)``."""
        return {
            "name": self.name,
            "class": self.monai_class,
            "kwargs": copy.deepcopy(self.kwargs),
            "img_size": list(self.img_size),
            "downstream_kwargs": copy.deepcopy(self.downstream_kwargs),
        }

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps ``[(B, C_i, D_i, H_i, W_i)]``, shallow → deep."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature: ``(B, C, D, H, W)`` → ``(B, feature_dim)`` by averaging the deepest map."""
        return self.forward_features(x)[-1].mean(dim=(2, 3, 4))

    def export_state_dict(self, target: str) -> dict[str, torch.Tensor]:
        """Encoder weights keyed exactly as the downstream network ``target`` names them.

        Args:
            target: a key of :attr:`downstream`, e.g. ``"SwinUNETR"``.

        Raises:
            ValueError: ``target`` is not a known downstream network for this encoder.
        """
        if target not in self.downstream:
            raise ValueError(
                f"encoder {self.name!r} cannot export to {target!r}; known targets: {sorted(self.downstream)}"
            )
        prefix = self.downstream[target]
        return {
            prefix + k: v
            for k, v in self.net.state_dict().items()
            if not any(k.startswith(p) for p in self.exclude_prefixes)
        }


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


class SegResNetEncoder(Encoder):
    """The encoder half of MONAI ``SegResNet`` (``convInit`` + ``down_layers``, keys as in SegResNet).

    ``kwargs`` are ``SegResNet`` arguments; the decoder is built and dropped. Maps: one per down
    layer, ``init_filters * 2**i`` channels at stride ``2**i``.
    """

    name = "segresnet"
    monai_class = "monai.networks.nets.SegResNet"

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        full = SegResNet(**self.kwargs)
        self.net = nn.Module()
        self.net.convInit = full.convInit
        self.net.down_layers = full.down_layers
        f = int(self.kwargs["init_filters"])
        self.feature_channels = [f * 2**i for i in range(len(self.kwargs["blocks_down"]))]
        self.downstream = {"SegResNet": ""}
        self.downstream_kwargs = {"SegResNet": {k: v for k, v in self.kwargs.items() if k != "out_channels"}}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.net.convInit(x)
        out = []
        for down in self.net.down_layers:
            x = down(x)
            out.append(x)
        return out

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        init_filters: int = 16,
        blocks_down: tuple[int, ...] = (1, 2, 2, 4),
        blocks_up: tuple[int, ...] = (1, 1, 1),
        norm: str | tuple = ("GROUP", {"num_groups": 8}),
        act: str | tuple = ("RELU", {"inplace": True}),
        dropout_prob: float | None = None,
    ) -> SegResNetEncoder:
        kwargs = dict(spatial_dims=3, init_filters=init_filters, in_channels=in_channels)
        kwargs |= dict(out_channels=2, dropout_prob=dropout_prob, act=act, norm=norm)
        kwargs |= dict(blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up))
        return cls(kwargs, img_size)


class ResNetEncoder(Encoder):
    """MONAI 3D ``ResNet`` (resnet10/18/34 layouts) with ``feed_forward=False``.

    Maps: outputs of ``layer1..layer4`` (channels ``block_inplanes * widen_factor``).
    """

    name = "resnet3d"
    monai_class = "monai.networks.nets.ResNet"

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        self.net = ResNet(**self.kwargs)
        self.feature_channels = [int(p * self.kwargs["widen_factor"]) for p in self.kwargs["block_inplanes"]]
        self.downstream = {"ResNet": ""}
        self.downstream_kwargs = {"ResNet": {k: v for k, v in self.kwargs.items() if k != "feed_forward"}}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        out = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            out.append(x)
        return out

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        depth: int = 18,
        widen_factor: float = 1.0,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        shortcut_type: str = "B",
        bias_downsample: bool = True,
    ) -> ResNetEncoder:
        """``depth`` ∈ {10, 18, 34} (MONAI ``resnet10/18/34``); ``widen_factor`` scales all widths."""
        if depth not in _RESNET_LAYERS:
            raise ValueError(f"resnet3d depth must be one of {sorted(_RESNET_LAYERS)}, got {depth}")
        # block_inplanes = monai.networks.nets.resnet.get_inplanes(), as resnet10/18/34 use
        kwargs = dict(block="basic", layers=_RESNET_LAYERS[depth], block_inplanes=[64, 128, 256, 512])
        kwargs |= dict(spatial_dims=3, n_input_channels=in_channels, conv1_t_size=conv1_t_size)
        kwargs |= dict(conv1_t_stride=conv1_t_stride, no_max_pool=no_max_pool, shortcut_type=shortcut_type)
        kwargs |= dict(widen_factor=widen_factor, feed_forward=False, bias_downsample=bias_downsample)
        return cls(kwargs, img_size)


class UNetEncoder(Encoder):
    """A MONAI ``BasicUNet`` encoder-decoder (Models Genesis restoration; ``out_channels = in_channels``).

    Maps: ``conv_0, down_1..down_4`` outputs (channels ``features[:5]``, strides 1..16).
    :meth:`reconstruct` runs the whole U-Net. ``final_conv`` is not exported (task specific).
    """

    name = "unet"
    monai_class = "monai.networks.nets.BasicUNet"
    exclude_prefixes = ("final_conv.",)

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        self.net = BasicUNet(**self.kwargs)
        self.feature_channels = [int(f) for f in self.kwargs["features"][:5]]
        self.downstream = {"BasicUNet": ""}
        self.downstream_kwargs = {"BasicUNet": {k: v for k, v in self.kwargs.items() if k != "out_channels"}}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x0 = n.conv_0(x)
        x1 = n.down_1(x0)
        x2 = n.down_2(x1)
        x3 = n.down_3(x2)
        return [x0, x1, x2, x3, n.down_4(x3)]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Full encoder-decoder: ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``; sides divisible by 16."""
        return self.net(x)

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        features: tuple[int, ...] = (32, 32, 64, 128, 256, 32),
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> UNetEncoder:
        if len(features) != 6:
            raise ValueError(f"BasicUNet needs 6 feature sizes, got {features}")
        kwargs = dict(spatial_dims=3, in_channels=in_channels, out_channels=in_channels)
        kwargs |= dict(features=tuple(features), act=act, norm=norm, dropout=dropout, upsample=upsample)
        return cls(kwargs, img_size)


ENCODERS: dict[str, type[Encoder]] = {
    c.name: c for c in (SwinViTEncoder, ViTEncoder, SegResNetEncoder, ResNetEncoder, UNetEncoder)
}


def build_encoder(
    name: str, *, in_channels: int = 1, img_size: tuple[int, int, int] = (64, 64, 64), **kwargs: Any
) -> Encoder:
    """Build an encoder by name; ``kwargs`` are the family's ``build`` arguments (e.g. ``feature_size``).

    Args:
        name: one of :data:`ENCODERS` (``swinvit, vit, segresnet, resnet3d, unet``).
        in_channels: input channels ``C`` of ``(B, C, D, H, W)``.
        img_size: training crop ``(D, H, W)`` in voxels (the ViT position embedding depends on it).

    Raises:
        ValueError: unknown name, or invalid arguments for that family.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name].build(
        in_channels=in_channels, img_size=tuple(ensure_tuple_rep(img_size, 3)), **kwargs
    )


def rebuild_encoder(recipe: dict[str, Any]) -> Encoder:
    """Rebuild an encoder (fresh weights) from ``Encoder.recipe`` (e.g. read from a checkpoint).

    Raises:
        ValueError: the recipe names an unknown encoder or another MONAI class than expected.
    """
    name = recipe.get("name")
    if name not in ENCODERS:
        raise ValueError(f"recipe names unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    cls = ENCODERS[name]
    if recipe.get("class", cls.monai_class) != cls.monai_class:
        raise ValueError(f"recipe class {recipe.get('class')!r} != {cls.monai_class!r} for encoder {name!r}")
    return cls(dict(recipe["kwargs"]), tuple(recipe["img_size"]))
