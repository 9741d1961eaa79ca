"""Convolutional encoders: the ``SegResNet`` encoder half, the whole ``SegResNet`` U-Net (SparK), 3D ``ResNet``
and the ``BasicUNet`` (Genesis).

See :mod:`medssl.networks.encoders` for the shared interface and the registry (``ENCODERS``).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet, ResNet, SegResNet
from torch import nn

from medssl.networks.encoder_base import Encoder

__all__ = [
    "SegResNetEncoder",
    "SegResNetUNetEncoder",
    "ResNetEncoder",
    "UNetEncoder",
    "resnet_features",
    "basicunet_features",
]


def resnet_features(net: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``layer1..layer4`` of a MONAI ``ResNet`` (stem, then each stage), shallow → deep."""
    x = net.act(net.bn1(net.conv1(x)))
    if not net.no_max_pool:
        x = net.maxpool(x)
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return out


def basicunet_features(net: BasicUNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of ``conv_0, down_1..down_4`` of a MONAI ``BasicUNet`` (strides 1..16), shallow → deep."""
    out = [net.conv_0(x)]
    for down in (net.down_1, net.down_2, net.down_3, net.down_4):
        out.append(down(out[-1]))
    return out

_RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def _segresnet_kwargs(
    in_channels: int,
    out_channels: int,
    init_filters: int,
    blocks_down: tuple[int, ...],
    blocks_up: tuple[int, ...],
    norm: str | tuple,
    act: str | tuple,
    dropout_prob: float | None,
) -> dict:
    """MONAI ``SegResNet`` constructor arguments shared by ``segresnet`` and ``segresnet_unet``."""
    return dict(
        spatial_dims=3, init_filters=init_filters, in_channels=in_channels, out_channels=out_channels,
        dropout_prob=dropout_prob, act=act, norm=norm, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
    )


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
        kwargs = _segresnet_kwargs(in_channels, 2, init_filters, blocks_down, blocks_up, norm, act, dropout_prob)
        return cls(kwargs, img_size)


class SegResNetUNetEncoder(Encoder):
    """The whole MONAI ``SegResNet`` (encoder *and* decoder), for masked image modelling (``spark``).

    Same constructor arguments, maps and ``downstream_kwargs`` as ``segresnet`` (so a finetuning
    ``SegResNet`` is built exactly alike), but ``net`` is the full U-Net with ``out_channels =
    in_channels``: :meth:`reconstruct` runs it. Everything but ``conv_final`` (the task head) is exported:
    ``convInit``, ``down_layers`` (the encoder) and ``up_samples``, ``up_layers`` (the pretrained decoder,
    see :func:`medssl.networks.downstream.transfer_keys`). Input sides must be multiples of
    ``2 ** (len(blocks_down) - 1)``.
    """

    name = "segresnet_unet"
    monai_class = "monai.networks.nets.SegResNet"
    exclude_prefixes = ("conv_final.",)

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        self.net = SegResNet(**self.kwargs)
        f = int(self.kwargs["init_filters"])
        self.feature_channels = [f * 2**i for i in range(len(self.kwargs["blocks_down"]))]
        self.downstream = {"SegResNet": ""}
        self.downstream_kwargs = {"SegResNet": {k: v for k, v in self.kwargs.items() if k != "out_channels"}}

    @property
    def total_stride(self) -> int:
        """Downsampling factor of the deepest map (``2 ** (len(blocks_down) - 1)``)."""
        return 2 ** (len(self.kwargs["blocks_down"]) - 1)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.encode(x)[1]  # convInit (+ dropout), then every down layer's output

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The U-Net decoder and ``conv_final`` on maps as :meth:`forward_features` gives them (shallow → deep).

        Returns:
            ``(B, out_channels, D, H, W)`` at the input resolution.
        """
        return self.net.decode(features[-1], features[::-1])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Full encoder-decoder: ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``."""
        return self.net(x)

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
    ) -> SegResNetUNetEncoder:
        """Arguments as ``segresnet`` (MONAI ``SegResNet``); ``len(blocks_up) == len(blocks_down) - 1``."""
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(
                f"segresnet_unet needs len(blocks_up) == len(blocks_down) - 1 (a full U-Net), got "
                f"blocks_down={tuple(blocks_down)}, blocks_up={tuple(blocks_up)}"
            )
        kwargs = _segresnet_kwargs(
            in_channels, in_channels, init_filters, blocks_down, blocks_up, norm, act, dropout_prob
        )
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
        return resnet_features(self.net, x)

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
        return basicunet_features(self.net, x)

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
