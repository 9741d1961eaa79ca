"""Finetuning options on a downstream network: linear probe, layer-wise LR decay, encoder warm-up.

The linear probe (:func:`freeze_encoder`) freezes the encoder completely: parameters without gradients *and*
its modules in ``eval()`` mode (BatchNorm / InstanceNorm running statistics unchanged, dropout off), kept so
by a ``train()`` override on those modules, so ``model.train()`` in the training loop does not undo it.

Parameters are told apart by :mod:`medssl.networks.downstream_keys`; every public name here is
re-exported by :mod:`medssl.networks.downstream` (and :mod:`medssl.networks.transfer`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.networks.downstream_keys import encoder_depths, is_encoder_key

__all__ = ["freeze_encoder", "frozen_modules", "layerwise_lr_groups", "EncoderWarmup"]


def _train_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen encoder module: it (and its children) stay in ``eval()`` mode."""
    return nn.Module.train(self, False)


def frozen_modules(model: nn.Module, kind: str) -> list[str]:
    """Names of the outermost modules of ``model`` that belong to its encoder (``kind``'s key prefixes)."""
    out: list[str] = []
    for name, _ in model.named_modules():
        if name and is_encoder_key(f"{name}.", kind) and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return out


def freeze_encoder(model: nn.Module, kind: str, *, freeze: bool = True) -> list[str]:
    """Linear probe: ``requires_grad = not freeze`` on every encoder parameter of ``model``, and the encoder
    modules held in ``eval()`` mode (``freeze=False`` undoes both).

    Held in eval mode: BatchNorm / InstanceNorm running statistics do not change and dropout is off while the
    head trains; ``model.train()`` does not undo it (the frozen modules' ``train`` is overridden on the
    instances). A pretrained decoder (BasicUNet ``upcat_*``) stays trainable with the head.

    Returns:
        Names of the parameters changed (all encoder parameters).

    Raises:
        MedsslError: ``model`` has no encoder parameters for ``kind``.
    """
    names = []
    for name, p in model.named_parameters():
        if is_encoder_key(name, kind):
            p.requires_grad_(not freeze)
            names.append(name)
    if not names:
        raise MedsslError(f"no encoder parameters found in this model for kind {kind!r}")
    mods = dict(model.named_modules())
    for name in frozen_modules(model, kind):
        for m in mods[name].modules():
            if freeze:
                m.train = types.MethodType(_train_frozen, m)  # type: ignore[method-assign]
            else:
                m.__dict__.pop("train", None)
        mods[name].train(not freeze and model.training)
    return names


def layerwise_lr_groups(model: nn.Module, kind: str, base_lr: float, decay: float) -> list[dict[str, Any]]:
    """Optimizer param groups with layer-wise learning-rate decay (BEiT / MAE finetuning recipe).

    The decoder / head (every non-encoder parameter, a pretrained BasicUNet decoder included) gets
    ``base_lr``; an encoder parameter at depth level ``d`` (:func:`encoder_depths`: 0 = stem …
    ``n - 1`` = deepest) gets ``base_lr * decay ** (n - d)``. Example, SwinUNETR, ``decay=0.5``: head 1.0, ``layers4`` 0.5,
    ``layers3`` 0.25, … ``patch_embed`` 0.5**5 (× ``base_lr``).

    Returns:
        Groups ordered head → stem, each ``{"params", "param_names", "lr", "lr_scale", "depth", "name",
        "encoder"}`` (``lr_scale`` is what ``engines.schedules.WarmupCosineSchedule`` multiplies in;
        ``encoder`` is what :class:`EncoderWarmup` reads). Every parameter appears exactly once, frozen
        ones included.

    Raises:
        ValueError: ``base_lr <= 0`` or ``decay`` outside (0, 1].
    """
    if base_lr <= 0 or not 0.0 < decay <= 1.0:
        raise ValueError(f"base_lr > 0 and decay in (0, 1] expected, got {base_lr}, {decay}")
    depths = encoder_depths(model, kind)
    n = 1 + max(depths.values(), default=-1)
    by_level: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        by_level.setdefault(depths.get(name, n), []).append((name, p))
    groups = []
    for level in sorted(by_level, reverse=True):
        scale = decay ** (n - level)
        groups.append(
            {
                "params": [p for _, p in by_level[level]],
                "param_names": [k for k, _ in by_level[level]],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "depth": level,
                "name": "head" if level == n else f"encoder.depth{level}",
                "encoder": level != n,
            }
        )
    return groups


class EncoderWarmup:
    """Keep the encoder's learning rate at 0 for ``frozen_steps`` optimizer steps, then ramp it up.

    The multiplier for optimizer step ``t`` (from 0) is 0 for ``t < frozen_steps``, then rises linearly
    to 1 over ``ramp_steps`` (``(t - frozen_steps + 1) / ramp_steps``), then stays 1. Example:
    ``EncoderWarmup(2, 2)`` gives 0, 0, 0.5, 1, 1, …

    Engine use: build the optimizer from :func:`layerwise_lr_groups` (groups carry ``"encoder"``); at
    each step, after the lr schedule has written the step's lrs, call ``warm.apply(optimizer, t)``
    before ``optimizer.step()``. It scales the lr of encoder groups only, and remembers the unscaled
    value, so it does not compound whether or not a schedule rewrites the lrs every step.
    ``warm.frozen(t)`` lets the engine skip encoder gradients (``torch.no_grad`` / ``freeze_encoder``)
    while the multiplier is 0. With AdamW, moments still accumulate for the encoder during the frozen
    phase (lr 0 also zeroes its decoupled weight decay).

    Args:
        frozen_steps: steps with encoder lr 0 (>= 0).
        ramp_steps: linear ramp length after that (>= 0).
    """

    def __init__(self, frozen_steps: int, ramp_steps: int = 0) -> None:
        if frozen_steps < 0 or ramp_steps < 0:
            raise ValueError(f"frozen_steps and ramp_steps must be >= 0, got {frozen_steps}, {ramp_steps}")
        self.frozen_steps, self.ramp_steps = int(frozen_steps), int(ramp_steps)

    def __call__(self, step: int) -> float:
        """lr multiplier of the encoder groups at optimizer step ``step``."""
        if step < self.frozen_steps:
            return 0.0
        if self.ramp_steps and step < self.frozen_steps + self.ramp_steps:
            return (step - self.frozen_steps + 1) / self.ramp_steps
        return 1.0

    def frozen(self, step: int) -> bool:
        """True while the encoder lr is 0."""
        return self(step) == 0.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Scale the lr of groups with ``group["encoder"]`` for ``step``; returns the multiplier."""
        m = self(step)
        for g in optimizer.param_groups:
            if not g.get("encoder", False):
                continue
            # lr still what we set last time → nobody rewrote it: restart from the remembered base
            base = g["warmup_base_lr"] if g.get("warmup_set_lr") == g["lr"] else g["lr"]
            g["lr"] = base * m
            g["warmup_base_lr"], g["warmup_set_lr"] = base, g["lr"]
        return m
