"""Group / instance normalisation with fp32-accurate statistics in an ONNX graph (used by the ONNX export).

Why this exists (measured by ``benchmarks/export_parity.py``, issue 10): every ONNX exporter lowers
``nn.GroupNorm`` (opsets 17/18, dynamo and the legacy TorchScript-based exporter alike) to ``Reshape(N, G, -1)``
→ ``InstanceNormalization`` → ``Mul``/``Add``, and ``nn.InstanceNorm3d`` to ``InstanceNormalization``. ONNX
Runtime's CPU ``InstanceNormalization`` (``Xi.mean()`` and ``(Xi - mean).squaredNorm()``, Eigen) sums each group
in fp32 in one long run, so its error grows with the group size: on a 200-step SegResNet-8 the first GroupNorm
(one 64×32×32 = 65,536-voxel channel per group) is 1.35e-4 from an fp64 reference where torch's GroupNorm is
5.2e-7, and the logits end 1.9e-4 from fp64 (eager fp32: 3.9e-6). No session option changes it (every graph
optimisation level gives the same numbers) and opset 21's ``GroupNormalization`` is worse (3.0e-4). One
``GroupNorm(1, 1)`` on a real hippocampus volume padded to 64³: ORT 6.6e-4 from fp64, torch 3.6e-7, cascaded 2.8e-7.

:class:`CascadedGroupNorm` computes the same function with standard ONNX ops whose sums stay short: the group is
viewed as ``(N, G, C/G, D, H, W)`` and ``mean`` / ``var`` are reduced one axis at a time (W, then H, D, C/G:
each a sum over one axis' length), a cascade that keeps fp32 round-off near torch's; ``x - mean`` is formed before
scaling (no ``x·s − mean·s`` cancellation). Dynamic batch and spatial sizes are kept (only ``C`` is fixed).
:func:`cascade_norms` returns a copy of a network with every ``GroupNorm`` and statistics-free
``InstanceNorm{1,2,3}d`` replaced; the eager network is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["CascadedGroupNorm", "cascade_norms", "count_norms"]

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class CascadedGroupNorm(nn.Module):
    """``nn.GroupNorm`` (biased variance, ``eps`` inside the root) with axis-by-axis reductions.

    Args:
        num_groups: ``G``; ``num_channels``: ``C`` (divisible by ``G``); ``eps``: added to the variance.
        weight, bias: per-channel affine ``(C,)`` or ``None`` (no affine; e.g. MONAI's InstanceNorm).

    Input ``(N, C, *spatial)`` float → output of the same shape.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} must be a positive multiple of num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), float(eps)
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_groups
        xg = x.reshape(x.shape[0], g, self.num_channels // g, *x.shape[2:])  # (N, G, C/G, *spatial)
        axes = list(range(xg.ndim - 1, 1, -1))  # innermost spatial axis first, the channels of a group last
        mean = xg
        for a in axes:
            mean = mean.mean(dim=a, keepdim=True)  # (N, G, 1, ..., 1) after the last axis
        dev = xg - mean
        var = dev * dev
        for a in axes:
            var = var.mean(dim=a, keepdim=True)
        y = (dev * torch.rsqrt(var + self.eps)).reshape(x.shape)
        affine = (1, self.num_channels) + (1,) * (x.ndim - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(affine)
        if self.bias is not None:
            y = y + self.bias.reshape(affine)
        return y


def _replacement(mod: nn.Module) -> CascadedGroupNorm | None:
    if isinstance(mod, nn.GroupNorm):
        return CascadedGroupNorm(mod.num_groups, mod.num_channels, mod.eps, mod.weight if mod.affine else None,
                                 mod.bias if mod.affine else None)
    if isinstance(mod, _INSTANCE) and not mod.track_running_stats:  # running stats: no reduction at inference
        return CascadedGroupNorm(mod.num_features, mod.num_features, mod.eps, mod.weight if mod.affine else None,
                                 mod.bias if mod.affine else None)
    return None


def count_norms(net: nn.Module) -> dict[str, int]:
    """How many layers of each class :func:`cascade_norms` replaces in ``net``, e.g. ``{"GroupNorm": 25}``."""
    counts: dict[str, int] = {}
    for mod in net.modules():
        if _replacement(mod) is not None:
            counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
    return counts


def cascade_norms(net: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A deep copy of ``net`` with every ``GroupNorm`` / statistics-free ``InstanceNorm*d`` replaced by
    :class:`CascadedGroupNorm` (same outputs in exact arithmetic); ``net`` itself is untouched.

    Returns:
        ``(copy, counts)``: ``counts`` maps the replaced class names to how many, e.g. ``{"GroupNorm": 25}``.
    """
    out = copy.deepcopy(net)
    counts: dict[str, int] = {}
    for name, mod in list(out.named_modules()):
        new = _replacement(mod)
        if new is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, new)
        counts[type(mod).__name__] = counts.get(type(mod).__name__, 0) + 1
    root = _replacement(out)  # the network is itself one norm layer
    if root is not None:
        out, counts = root, {type(net).__name__: 1}
    return out.eval(), counts
