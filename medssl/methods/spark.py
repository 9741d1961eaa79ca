"""SparK-style masked image modelling for a CNN U-Net (Tian et al. 2023, "Designing BERT for Convolutional
Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023, arXiv:2301.03580), as used for 3D medical
segmentation by Wald et al. 2025 ("Revisiting MAE pre-training for 3D medical image segmentation", CVPR 2025,
arXiv:2410.23132; nnssl): random patches of the input are hidden, the encoder sees only the visible ones, the
*whole* U-Net (encoder and decoder) reconstructs the input, and both transfer to the segmentation network of the
same architecture, in which only the output layer is new. Two U-Nets: MONAI's ``SegResNet`` (encoder
``segresnet_unet``; only ``conv_final`` new) and MONAI's residual ``UNet`` (encoder ``monai_unet``; only the top
up block ``model.2`` new).

Sparse convolutions are approximated, not used: no sparse-convolution library (MinkowskiEngine, spconv,
TorchSparse) is in our dependencies, and they are not MONAI networks whose weights load into MONAI's
networks. Masked voxels are zeroed at the input and **re-masked after every encoder block**, at that block's
resolution: the visible mask, downsampled to the block's grid, multiplies its output, so nothing computed at a
masked position ever reaches a later block. SegResNet: after ``convInit``, each down layer's strided conv and
each of its ``ResBlock``s (an explicit loop, MONAI's ``SegResNet.encode`` with one multiplication per block).
UNet: after every down block and the bottom block, and inside each of their residual units after every
convolution sub-unit (``unit0`` strided, ``unit1`` …), through forward hooks registered on those sub-units for
the duration of the encoder pass (so MONAI's own ``ResidualUnit.forward`` runs; the residual branch is
re-masked with the block's output). What stays different from true sparse convolution: a visible voxel next to
a masked one still sees zeros (not "no input") in its 3×3×3 window, and Group/InstanceNorm statistics include
the zeroed positions (SparK's sparse BatchNorm ignores them). Wald et al. found this dense, zero-masked variant
to pretrain as well as the sparse one for 3D CNNs.

Before the decoder, masked positions of every skip map are filled with a learned per-stage mask token (SparK's
"densifying", ``mask_tokens=True``). The loss is the MSE on the masked patches only, against per-patch
normalised targets (mean 0 / std 1 over each patch's voxels and channels; MAE's and SparK's ``norm_pix_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import nn

from medssl.losses.precision import at_least_fp32
from medssl.losses.restoration import RestorationLoss
from medssl.methods.base import SSLMethod
from medssl.methods.mae import patchify
from medssl.networks.encoders import MonaiUNetEncoder, SegResNetUNetEncoder
from medssl.networks.encoders_unet import unet_blocks

__all__ = ["SparK", "normalise_patches", "upsample_mask"]


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised targets: ``(B, N, P)`` → ``(x - mean) / sqrt(var + eps)`` over each patch's ``P``
    values (unbiased variance, as MAE/SparK); a constant patch becomes 0."""
    mu = patches.mean(dim=-1, keepdim=True)  # (B, N, 1)
    var = patches.var(dim=-1, keepdim=True)  # (B, N, 1)
    return (patches - mu) / (var + eps).sqrt()


def upsample_mask(grid_mask: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Patch-grid mask ``(B, 1, gd, gh, gw)`` → ``(B, 1, gd·fd, gh·fh, gw·fw)`` (each cell repeated ``factor``)."""
    m = grid_mask
    for axis, f in enumerate(factor):
        if int(f) > 1:
            m = m.repeat_interleave(int(f), dim=axis + 2)
    return m


def _mask_output(visible: torch.Tensor, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output re-masked (``output * visible``, visible ``(B, 1, d, h, w)``)."""
    return output * visible


def _fmt(stride: tuple[int, int, int]) -> str:
    return str(stride[0]) if len(set(stride)) == 1 else str(tuple(stride))


class SparK(SSLMethod):
    """Masked image modelling on a whole U-Net: ``SegResNet`` (``segresnet_unet``) or MONAI ``UNet`` (``monai_unet``).

    Per sample, exactly ``round(mask_ratio * N)`` of the ``N`` patches of ``view1`` are masked, drawn from
    torch's global CPU generator (so ``torch.manual_seed`` and the engine's checkpointed RNG state make masks
    reproducible and resume exact, on any device), unless the batch carries ``view1_mask``
    ``(B, 1, D, H, W)`` from a masking transform: then a patch is masked where at least half its voxels are.
    The target is ``view1_target`` when present (a transform that masked ``view1`` keeps the original
    there), else ``view1``.

    Args:
        encoder: a :class:`~medssl.networks.encoders.SegResNetUNetEncoder` or
            :class:`~medssl.networks.encoders.MonaiUNetEncoder` (``out_channels == in_channels``).
        mask_ratio: fraction of patches hidden, in ``(0, 1)`` (SparK: 0.6). E.g. 0.6 of a 32³ view with 8³
            patches masks 38 of 64 patches.
        patch_size: masking patch ``(pd, ph, pw)`` in voxels (an int for a cube), each a multiple of the
            encoder's total stride (SegResNet ``2 ** (len(blocks_down) - 1)``, UNet ``prod(strides)`` per axis) so
            that a patch covers whole voxels of the deepest map; ``None`` = that stride (SparK: the downsampling
            ratio): 8³ for the default SegResNet and for a UNet with strides ``[2, 2, 2]``.
        mask_tokens: fill masked positions of every encoder map with a learned per-stage token before the
            decoder (SparK's densifying); ``False`` leaves them zero.
        norm_pix_loss: regress per-patch normalised targets (:func:`normalise_patches`); ``False`` = raw
            intensities.

    Returns (``forward``): ``{"loss", "masked_ratio" (share of masked voxels), "spark_mse" (= loss)}``.
    """

    name = "spark"
    required_keys = frozenset({"view1"})

    def __init__(
        self,
        encoder: SegResNetUNetEncoder | MonaiUNetEncoder,
        mask_ratio: float = 0.6,
        patch_size: int | Sequence[int] | None = None,
        mask_tokens: bool = True,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__(encoder)
        if not isinstance(encoder, (SegResNetUNetEncoder, MonaiUNetEncoder)):
            raise ValueError(
                "spark needs the 'segresnet_unet' encoder or the 'monai_unet' one (the whole U-Net is pretrained), "
                f"got {encoder.name!r}"
            )
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"spark: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.unet = isinstance(encoder, MonaiUNetEncoder)
        # (sd, sh, sw) of each encoder map: SegResNet 1, 2, 4, … (its first map is at full resolution)
        self.strides: list[tuple[int, int, int]] = (
            list(encoder.stage_strides) if self.unet else [(2**i,) * 3 for i in range(len(encoder.feature_channels))]
        )
        stride = self.strides[-1]
        ps = stride if patch_size is None else patch_size
        ps = (int(ps),) * 3 if isinstance(ps, (int, float)) else tuple(int(p) for p in ps)
        if len(ps) != 3 or any(p < 1 or p % s for p, s in zip(ps, stride, strict=False)):
            raise ValueError(
                f"spark: patch_size {patch_size!r} must be 3 positive multiples of the encoder's total stride "
                f"{_fmt(stride)} ({encoder.name}: the product of its downsampling strides)"
            )
        self.mask_ratio, self.patch_size = float(mask_ratio), ps
        self.norm_pix_loss = bool(norm_pix_loss)
        # (1, C_i, 1, 1, 1) per stage; SparK initialises its mask tokens with trunc_normal(std=.02)
        self.mask_tokens = (
            nn.ParameterList(
                nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, 1, 1, 1), std=0.02))
                for c in encoder.feature_channels
            )
            if mask_tokens
            else None
        )
        self.criterion = RestorationLoss("l2", "masked")

    # -- masks ------------------------------------------------------------------------------------------
    def grid_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid of a view ``(D, H, W)``; ``ValueError`` naming both when a side is not divisible."""
        if any(int(s) % p for s, p in zip(shape, self.patch_size, strict=True)):
            raise ValueError(
                f"spark: view size {tuple(shape)} is not divisible by patch_size {self.patch_size}; "
                "choose roi_size as multiples of it"
            )
        gd, gh, gw = (int(s) // p for s, p in zip(shape, self.patch_size, strict=True))
        return gd, gh, gw

    def draw_mask(self, b: int, shape: Sequence[int]) -> torch.Tensor:
        """Random patch mask ``(B, 1, gd, gh, gw)`` float on the CPU, 1 = masked, exactly
        ``round(mask_ratio * N)`` (at least 1, at most ``N - 1``) masked patches per sample."""
        grid = self.grid_shape(shape)
        n = grid[0] * grid[1] * grid[2]
        n_mask = min(max(int(round(self.mask_ratio * n)), 1), n - 1)
        rank = torch.rand(b, n).argsort(dim=1).argsort(dim=1)  # (B, N) random rank of each patch
        return (rank < n_mask).float().view(b, 1, *grid)

    def patch_mask_from_voxels(self, voxel_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` voxel mask (1 = masked) → ``(B, 1, gd, gh, gw)``: a patch is masked where at
        least half of its voxels are (exact for a patch mask on the same grid, e.g. ``mask="patch"`` with this
        ``patch_size``; a cuboid mask is rounded to whole patches)."""
        self.grid_shape(voxel_mask.shape[2:])
        share = F.avg_pool3d(voxel_mask.float(), kernel_size=self.patch_size, stride=self.patch_size)
        return (share >= 0.5).float()

    def stage_masks(self, grid_mask: torch.Tensor) -> list[torch.Tensor]:
        """Visible masks (1 = visible) of every encoder map: ``[(B, 1, D/s, H/s, W/s)]`` for each map's stride
        ``s`` (:attr:`strides`; SegResNet ``1, 2, 4, …``: the input and the first map share stride 1; UNet
        ``2, 4, 8, 8`` for strides ``[2, 2, 2]``: the bottom block shares the deepest grid)."""
        visible = 1.0 - grid_mask
        return [
            upsample_mask(visible, [p // s for p, s in zip(self.patch_size, st, strict=True)]) for st in self.strides
        ]

    # -- network ----------------------------------------------------------------------------------------
    def sparse_encode(self, x: torch.Tensor, visible: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder maps of the masked input, shallow → deep, zero at every masked position.

        ``x`` is masked, then each block's output is multiplied by the visible mask of its grid (the
        re-masking that stands in for sparse convolution; see the module docstring). SegResNet: MONAI's
        ``SegResNet.encode`` with one multiplication per block; UNet: :meth:`_sparse_encode_unet`.

        Args:
            x: ``(B, C, D, H, W)``.
            visible: :meth:`stage_masks` (moved to ``x``'s device and dtype).
        """
        if self.unet:
            return self._sparse_encode_unet(x, visible)
        net = self.encoder.net
        h = net.convInit(x * visible[0]) * visible[0]
        if net.dropout_prob is not None:
            h = net.dropout(h)
        feats = []
        for stage, vis in zip(net.down_layers, visible, strict=True):
            for block in stage:  # strided conv (stages > 0), then the ResBlocks
                h = block(h) * vis
            feats.append(h)
        return feats

    def _sparse_encode_unet(self, x: torch.Tensor, visible: list[torch.Tensor]) -> list[torch.Tensor]:
        """MONAI ``UNet``: the input masked, then every down block and the bottom block re-masked at its grid,
        and inside a residual unit every convolution sub-unit too (forward hooks, removed after the pass)."""
        downs, bottom, _ = unet_blocks(self.encoder.net)
        h = x * upsample_mask(visible[0], self.strides[0])  # the input mask, from the first map's
        feats = []
        for block, vis in zip([*downs, bottom], visible, strict=True):
            units = list(block.conv) if isinstance(block, ResidualUnit) else []  # unit0 (strided), unit1, …
            hooks = [u.register_forward_hook(partial(_mask_output, vis)) for u in units]
            try:
                h = block(h) * vis  # residual unit: conv(h) + residual(h), re-masked
            finally:
                for hook in hooks:
                    hook.remove()
            feats.append(h)
        return feats

    def densify(self, feats: list[torch.Tensor], visible: list[torch.Tensor]) -> list[torch.Tensor]:
        """Masked positions of every map filled with that stage's mask token (unchanged without tokens)."""
        if self.mask_tokens is None:
            return feats
        return [
            torch.where(v.bool(), f, tok.to(f.dtype))
            for f, v, tok in zip(feats, visible, self.mask_tokens, strict=True)
        ]

    def reconstruct(self, x: torch.Tensor, grid_mask: torch.Tensor) -> torch.Tensor:
        """Masked input → the U-Net's reconstruction ``(B, C, D, H, W)`` of the whole view.

        Args:
            x: ``(B, C, D, H, W)``; its masked voxels need not be zero (they are zeroed here).
            grid_mask: ``(B, 1, gd, gh, gw)``, 1 = masked patch.
        """
        visible = [v.to(device=x.device, dtype=x.dtype) for v in self.stage_masks(grid_mask)]
        feats = self.densify(self.sparse_encode(x, visible), visible)
        return self.encoder.decode(feats)

    def loss_from(self, pred: torch.Tensor, target: torch.Tensor, grid_mask: torch.Tensor) -> torch.Tensor:
        """MSE over the masked patches only (visible voxels of ``pred`` do not count).

        Args:
            pred, target: ``(B, C, D, H, W)``.
            grid_mask: ``(B, 1, gd, gh, gw)``, 1 = masked patch.
        """
        pred, target = at_least_fp32(pred, target)  # fp32 normalisation and loss even under autocast
        pred_p = patchify(pred, self.patch_size)  # (B, N, C·pd·ph·pw), patches in (gd, gh, gw) order
        target_p = patchify(target, self.patch_size)  # (B, N, P)
        if self.norm_pix_loss:
            target_p = normalise_patches(target_p)
        m = grid_mask.to(pred_p.device).flatten(1)[..., None]  # (B, N, 1) in the same patch order
        return self.criterion(pred_p, target_p, m)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        x = batch["view1"]  # (B, C, D, H, W)
        if "view1_mask" in batch:
            grid_mask = self.patch_mask_from_voxels(batch["view1_mask"])
        else:
            grid_mask = self.draw_mask(x.shape[0], x.shape[2:]).to(x.device)
        pred = self.reconstruct(x, grid_mask)  # (B, C, D, H, W)
        loss = self.loss_from(pred, batch.get("view1_target", x), grid_mask)
        return {"loss": loss, "masked_ratio": grid_mask.mean().detach(), "spark_mse": loss.detach()}
