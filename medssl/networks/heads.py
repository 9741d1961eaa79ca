"""Heads for SSL methods. Heads are data: an MLP is a list of ``(in, out, norm, act)`` blocks.

``norm`` is ``"batch"`` (``BatchNorm1d``), ``"layer"`` (``LayerNorm``) or ``None``; ``act`` is
``"relu"``, ``"gelu"``, ``"leakyrelu"`` or ``None``. Plain strings keep every head constructible from a
bundle config; a variant is one list, e.g. the SimCLR head is
``[(in, hidden, "batch", "relu"), (hidden, out, None, None)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = [
    "ProjectionHead",
    "simclr_projection",
    "byol_projection",
    "byol_predictor",
    "vicreg_expander",
    "rotation_head",
    "ReconstructionHead",
]

_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "leakyrelu": nn.LeakyReLU}


class ProjectionHead(nn.Module):
    """An MLP from a list of ``(in_features, out_features, norm, act)`` blocks: ``(B, in)`` → ``(B, out)``.

    Each block is ``Linear → norm → act``; the linear layer has no bias when a norm follows (the norm's
    shift makes it redundant), as in lightly's ``ProjectionHead``.

    Args:
        blocks: consecutive blocks; ``out_features`` of one must equal ``in_features`` of the next.

    Raises:
        ValueError: empty list, inconsistent sizes, unknown norm/act names.
    """

    def __init__(self, blocks: Sequence[Sequence]) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("ProjectionHead needs at least one block")
        layers: list[nn.Module] = []
        prev = None
        for i, blk in enumerate(blocks):
            if len(blk) != 4:
                raise ValueError(f"block {i} must be (in, out, norm, act), got {blk!r}")
            n_in, n_out, norm, act = int(blk[0]), int(blk[1]), blk[2], blk[3]
            if n_in < 1 or n_out < 1:
                raise ValueError(f"block {i}: sizes must be positive, got {n_in}, {n_out}")
            if prev is not None and n_in != prev:
                raise ValueError(f"block {i} expects {n_in} inputs but block {i - 1} gives {prev}")
            if norm is not None and norm not in _NORMS:
                raise ValueError(f"block {i}: unknown norm {norm!r}; known: {sorted(_NORMS)} or None")
            if act is not None and act not in _ACTS:
                raise ValueError(f"block {i}: unknown act {act!r}; known: {sorted(_ACTS)} or None")
            layers.append(nn.Linear(n_in, n_out, bias=norm is None))
            if norm is not None:
                layers.append(_NORMS[norm](n_out))
            if act is not None:
                layers.append(_ACTS[act]())
            prev = n_out
        self.in_features = int(blocks[0][0])
        self.out_features = prev
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_features)`` → ``(B, out_features)``."""
        return self.layers(x)


def simclr_projection(in_dim: int, hidden: int = 2048, out: int = 128) -> ProjectionHead:
    """SimCLR projection g(·) (Chen et al. 2020, arXiv:2002.05709): Linear-BN-ReLU-Linear."""
    return ProjectionHead([(in_dim, hidden, "batch", "relu"), (hidden, out, None, None)])


def byol_projection(in_dim: int, hidden: int = 4096, out: int = 256) -> ProjectionHead:
    """BYOL projector (Grill et al. 2020, arXiv:2006.07733): Linear-BN-ReLU-Linear."""
    return ProjectionHead([(in_dim, hidden, "batch", "relu"), (hidden, out, None, None)])


def byol_predictor(in_dim: int = 256, hidden: int = 4096, out: int = 256) -> ProjectionHead:
    """BYOL predictor q(·), same shape as the projector, applied on the online branch only."""
    return ProjectionHead([(in_dim, hidden, "batch", "relu"), (hidden, out, None, None)])


def vicreg_expander(in_dim: int, hidden: int = 8192, out: int = 8192) -> ProjectionHead:
    """VICReg expander (Bardes et al. 2022, arXiv:2105.04906): two Linear-BN-ReLU blocks + Linear."""
    return ProjectionHead(
        [(in_dim, hidden, "batch", "relu"), (hidden, hidden, "batch", "relu"), (hidden, out, None, None)]
    )


def rotation_head(in_dim: int, n_classes: int = 4) -> ProjectionHead:
    """Linear rotation classifier ``(B, in_dim)`` → logits ``(B, n_classes)`` (Gidaris et al. 2018)."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    return ProjectionHead([(in_dim, n_classes, None, None)])


class ReconstructionHead(nn.Module):
    """Light 3D decoder from the deepest feature map back to the input resolution.

    Like the ``conv`` head of SwinUNETR pretraining (Tang et al. CVPR 2022, arXiv:2111.14791):
    ``num_upsamples`` stages, each doubling every spatial side and halving channels (not below
    ``min_channels``), then a 1×1×1 convolution to ``out_channels``.

    Args:
        in_channels: channels of the deepest map ``(B, in_channels, d, h, w)``.
        out_channels: channels of the reconstruction (the input's ``C``).
        num_upsamples: number of ×2 stages; the output is ``(B, out_channels, d·2^n, h·2^n, w·2^n)``.
        mode: ``"deconv"`` (transposed conv, stride 2) or ``"upsample"`` (conv + trilinear ×2).
        min_channels: lower bound on intermediate channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_upsamples: int,
        mode: str = "deconv",
        min_channels: int = 8,
    ) -> None:
        super().__init__()
        if mode not in ("deconv", "upsample"):
            raise ValueError(f"mode must be 'deconv' or 'upsample', got {mode!r}")
        if num_upsamples < 0 or in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels, out_channels must be >= 1 and num_upsamples >= 0")
        stages: list[nn.Module] = []
        c = in_channels
        for _ in range(num_upsamples):
            c_next = max(c // 2, min_channels)
            if mode == "deconv":
                stages.append(
                    Convolution(
                        3,
                        c,
                        c_next,
                        strides=2,
                        kernel_size=2,
                        padding=0,
                        output_padding=0,
                        is_transposed=True,
                        act="LEAKYRELU",
                        norm="INSTANCE",
                    )
                )
            else:
                stages.append(Convolution(3, c, c_next, kernel_size=3, act="LEAKYRELU", norm="INSTANCE"))
                stages.append(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))
            c = c_next
        stages.append(nn.Conv3d(c, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, d, h, w)`` → ``(B, out_channels, d·2^n, h·2^n, w·2^n)``."""
        return self.layers(x)
