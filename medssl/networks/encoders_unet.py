"""The MONAI residual ``UNet`` as an SSL encoder family (``monai_unet``): the whole U-Net, for masked image
modelling (SparK, :mod:`medssl.methods.spark`), transferring encoder *and* decoder into a finetuning ``UNet``.

MONAI's ``UNet`` nests its levels: ``model = Sequential(down_0, SkipConnection(<level 1>), up_0)``, level ``i``
being ``Sequential(down_i, SkipConnection(<level i+1>), up_i)`` down to the bottom block (a stride-1 residual
unit) inside the last ``SkipConnection``. The state-dict keys follow the nesting: with ``n`` = ``len(strides)``
levels and ``P_i = "model." + "1.submodule." * i``,

- encoder: ``down_i`` = ``P_i + "0."`` (``i < n``; its first conv is strided), the bottom = ``P_n`` (``conv.*``,
  ``residual.*``); depth level ``i`` for ``down_i``, ``n`` for the bottom;
- decoder: ``up_i`` = ``P_i + "2."``; the top one, ``up_0`` = ``model.2.*`` (transposed conv to ``out_channels`` +
  its residual unit), is the only part whose shapes depend on ``out_channels``: it is the task head, new in
  finetuning; ``up_1 … up_{n-1}`` are the pretrained decoder.

:func:`unet_blocks` finds the blocks by walking that structure (no copy of MONAI's forward), and
:func:`unet_key_prefixes` gives the key prefixes for any depth (the tables of
:mod:`medssl.networks.downstream_keys`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from medssl.networks.encoder_base import Encoder

__all__ = ["MonaiUNetEncoder", "unet_blocks", "unet_features", "unet_key_prefixes", "unet_stage_strides"]

#: deepest MONAI UNet handled by the static key tables (the planner plans at most 5 levels)
MAX_LEVELS = 8


def unet_blocks(net: UNet) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """``(downs, bottom, ups)`` of a MONAI ``UNet``: ``downs[i]``/``ups[i]`` are level ``i``'s down and up
    blocks (shallow → deep), ``bottom`` the stride-1 block at the deepest level."""
    downs, ups = [], []
    node: nn.Module = net.model
    while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
        downs.append(node[0])
        ups.append(node[2])
        node = node[1].submodule
    return downs, node, ups


def unet_features(net: UNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every down block and of the bottom block, shallow → deep: ``len(strides) + 1`` maps with
    ``channels[i]`` channels (the first already at stride ``strides[0]``; the bottom shares the last grid)."""
    downs, bottom, _ = unet_blocks(net)
    out = []
    for block in [*downs, bottom]:
        x = block(x)
        out.append(x)
    return out


def unet_stage_strides(strides: list[Any]) -> list[tuple[int, int, int]]:
    """Cumulative stride ``(sd, sh, sw)`` of each :func:`unet_features` map. Example: ``[2, 2, 2]`` →
    ``[(2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8)]``; ``[[2, 2, 1], 2]`` → ``[(2, 2, 1), (4, 4, 2), (4, 4, 2)]``."""
    cum, out = [1, 1, 1], []
    for s in strides:
        per_axis = [int(s)] * 3 if isinstance(s, (int, float)) else [int(v) for v in s]
        cum = [c * v for c, v in zip(cum, per_axis, strict=True)]
        out.append(tuple(cum))
    return [*out, tuple(cum)]  # the bottom block is stride 1


def unet_key_prefixes(part: str, max_levels: int = MAX_LEVELS) -> tuple[str, ...]:
    """State-dict key prefixes of a MONAI ``UNet`` part, valid for every depth up to ``max_levels``.

    Args:
        part: ``"encoder"`` (every ``down_i`` and the bottom block), ``"decoder"`` (``up_1 … up_{n-1}``, the
            pretrained decoder) or ``"head"`` (``up_0``: ``model.2.``).

    A prefix of a level the network does not have matches no key (a ``Sequential`` level has only the
    children ``0``, ``1``, ``2``; a bottom block only ``conv``, ``residual``, ``adn``).
    """
    levels = ["model." + "1.submodule." * i for i in range(max_levels + 1)]
    if part == "encoder":
        bottoms = [p + child for p in levels[1:] for child in ("conv.", "residual.", "adn.")]
        return tuple(p + "0." for p in levels) + tuple(bottoms)
    if part == "decoder":
        return tuple(p + "2." for p in levels[1:])
    if part == "head":
        return ("model.2.",)
    raise ValueError(f"part must be 'encoder', 'decoder' or 'head', got {part!r}")


class MonaiUNetEncoder(Encoder):
    """The whole MONAI ``UNet`` with residual units (``out_channels = in_channels``), for SparK.

    ``kwargs`` are ``UNet`` arguments; ``downstream_kwargs["UNet"]`` are the same without ``out_channels``, so a
    finetuning ``UNet`` (``network: UNet``) is built exactly alike. Maps (:meth:`forward_features`): every down
    block's output and the bottom block's, ``channels`` channels at the strides of
    :func:`unet_stage_strides`. Everything but the top up block ``model.2.*`` (the task head) is exported. Input
    sides must be multiples of the total stride (``prod(strides)`` per axis).
    """

    name = "monai_unet"
    monai_class = "monai.networks.nets.UNet"
    exclude_prefixes = unet_key_prefixes("head")

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__(kwargs, img_size)
        self.net = UNet(**self.kwargs)
        self.feature_channels = [int(c) for c in self.kwargs["channels"]]
        self.stage_strides = unet_stage_strides(list(self.kwargs["strides"]))
        self.downstream = {"UNet": ""}
        self.downstream_kwargs = {"UNet": {k: v for k, v in self.kwargs.items() if k != "out_channels"}}

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Downsampling factor ``(sd, sh, sw)`` of the deepest map (``prod(strides)`` per axis)."""
        return self.stage_strides[-1]

    @property
    def size_divisor(self) -> int:
        """Every input side must be a multiple of this (the lcm of :attr:`total_stride`)."""
        return math.lcm(*self.total_stride)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return unet_features(self.net, x)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The decoder on maps as :meth:`forward_features` gives them: from the bottom up, ``up_i`` on the
        concatenation ``[map_i, deeper output]`` (what MONAI's ``SkipConnection(mode="cat")`` does).

        Returns:
            ``(B, out_channels, D, H, W)`` at the input resolution.
        """
        _, _, ups = unet_blocks(self.net)
        y = features[-1]
        for skip, up in zip(features[-2::-1], ups[::-1], strict=True):
            y = up(torch.cat([skip, y], dim=1))
        return y

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Full encoder-decoder: ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``."""
        return self.net(x)

    @classmethod
    def build(
        cls,
        in_channels: int,
        img_size: tuple[int, int, int],
        channels: tuple[int, ...] = (32, 64, 128, 256),
        strides: tuple[Any, ...] = (2, 2, 2),
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        num_res_units: int = 2,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
    ) -> MonaiUNetEncoder:
        """MONAI ``UNet`` arguments (defaults: MONAI's, with ``num_res_units=2`` as the finetuning ``UNet`` and
        the planner use); ``len(strides) == len(channels) - 1``, each stride an int or ``[sd, sh, sw]``.

        Raises:
            ValueError: fewer than 2 channels, or a strides / channels length mismatch (both named).
        """
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(
                f"monai_unet needs len(strides) == len(channels) - 1 >= 1, got channels={list(channels)}, "
                f"strides={list(strides)}"
            )
        if len(strides) > MAX_LEVELS:
            raise ValueError(f"monai_unet supports at most {MAX_LEVELS} levels, got strides={list(strides)}")
        kwargs = dict(spatial_dims=3, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels))
        kwargs |= dict(strides=tuple(strides), kernel_size=kernel_size, up_kernel_size=up_kernel_size)
        kwargs |= dict(num_res_units=num_res_units, act=act, norm=norm, dropout=dropout, bias=bias)
        kwargs |= dict(adn_ordering=adn_ordering)
        return cls(kwargs, img_size)
