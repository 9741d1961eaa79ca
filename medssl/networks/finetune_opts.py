"""Finetuning options on a downstream network: linear probe, layer-wise LR decay, encoder warm-up, and the
frozen phase of an SSL init's schedule.

The linear probe (:func:`freeze_encoder`) freezes the encoder completely: parameters without gradients *and*
its modules in ``eval()`` mode (BatchNorm / InstanceNorm running statistics unchanged, dropout off), kept so
by a ``train()`` override on those modules, so ``model.train()`` in the training loop does not undo it.
:func:`freeze_pretrained` does the same to the whole pretrained part (encoder and a transferred decoder) for
the first steps of ``FinetuneConfig.ssl_schedule``; :func:`layerwise_lr_groups` with ``pretrained=`` marks
those groups so the schedule can hold and ramp their lr.

Parameters are told apart by :mod:`medssl.networks.downstream_keys`; every public name here is
re-exported by :mod:`medssl.networks.downstream` (and :mod:`medssl.networks.transfer`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from medssl.errors import MedsslError
from medssl.networks.downstream_keys import (
    encoder_depths,
    encoder_key_prefixes,
    transfer_key_prefixes,
)

__all__ = ["freeze_encoder", "freeze_pretrained", "frozen_modules", "layerwise_lr_groups", "EncoderWarmup"]


def _train_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen encoder module: it (and its children) stay in ``eval()`` mode."""
    return nn.Module.train(self, False)


def frozen_modules(model: nn.Module, kind: str, prefixes: tuple[str, ...] | None = None) -> list[str]:
    """Names of the outermost modules of ``model`` under ``prefixes`` (default: ``kind``'s encoder prefixes)."""
    prefixes = encoder_key_prefixes(kind) if prefixes is None else prefixes
    out: list[str] = []
    for name, _ in model.named_modules():
        if name and f"{name}.".startswith(prefixes) and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return out


def _freeze(model: nn.Module, kind: str, prefixes: tuple[str, ...], freeze: bool, what: str) -> list[str]:
    """``requires_grad = not freeze`` under ``prefixes`` and those modules held in (or released from) eval."""
    names = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(not freeze)
            names.append(name)
    if not names:
        raise MedsslError(f"no {what} parameters found in this model for kind {kind!r}")
    mods = dict(model.named_modules())
    for name in frozen_modules(model, kind, prefixes):
        for m in mods[name].modules():
            if freeze:
                m.train = types.MethodType(_train_frozen, m)  # type: ignore[method-assign]
            else:
                m.__dict__.pop("train", None)
        mods[name].train(not freeze and model.training)
    return names


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
    return _freeze(model, kind, encoder_key_prefixes(kind), freeze, "encoder")


def freeze_pretrained(model: nn.Module, kind: str, family: str | None = None, *, freeze: bool = True) -> list[str]:
    """Like :func:`freeze_encoder`, for the whole pretrained part: the encoder plus the decoder an SSL encoder of
    ``family`` pretrains (:func:`~medssl.networks.downstream_keys.transfer_key_prefixes`; SparK's SegResNet
    ``up_samples``/``up_layers``, Genesis's BasicUNet ``upcat_*``). Parameters without gradients, modules in
    ``eval()`` (norm statistics and dropout frozen) until called with ``freeze=False``; only the new layers
    train meanwhile (the frozen phase of ``FinetuneConfig.ssl_schedule``).

    Returns:
        Names of the parameters changed.

    Raises:
        MedsslError: ``model`` has no pretrained parameters for ``kind``.
    """
    return _freeze(model, kind, transfer_key_prefixes(kind, family), freeze, "pretrained")


def layerwise_lr_groups(
    model: nn.Module,
    kind: str,
    base_lr: float,
    decay: float,
    *,
    pretrained: tuple[str, ...] | None = None,
    pretrained_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer param groups with layer-wise learning-rate decay (BEiT / MAE finetuning recipe).

    The decoder / head (every non-encoder parameter, a pretrained BasicUNet decoder included) gets
    ``base_lr``; an encoder parameter at depth level ``d`` (:func:`encoder_depths`: 0 = stem …
    ``n - 1`` = deepest) gets ``base_lr * decay ** (n - d)``. Example, SwinUNETR, ``decay=0.5``: head 1.0, ``layers4`` 0.5,
    ``layers3`` 0.25, … ``patch_embed`` 0.5**5 (× ``base_lr``).

    With ``pretrained`` (the key prefixes an SSL checkpoint filled, ``transfer_key_prefixes``; an SSL init's
    ``ssl_schedule``), a pretrained decoder gets its own group ``"decoder"`` at the head's level, and every
    pretrained group (encoder levels, decoder) is multiplied by ``pretrained_scale`` and marked
    ``"pretrained": True`` (what ``WarmupCosineSchedule`` holds at 0 and ramps); the new layers stay ``"head"``.
    Example, SegResNet from SparK, ``decay=1``, ``pretrained_scale=0.5``: head (``conv_final``) 1.0, decoder
    0.5, every encoder level 0.5 (× ``base_lr``).

    Returns:
        Groups ordered head → stem, each ``{"params", "param_names", "lr", "lr_scale", "depth", "name",
        "encoder"}`` (+ ``"pretrained"`` with ``pretrained=``) (``lr_scale`` is what
        ``engines.schedules.WarmupCosineSchedule`` multiplies in; ``encoder`` is what :class:`EncoderWarmup`
        reads). Every parameter appears exactly once, frozen ones included.

    Raises:
        ValueError: ``base_lr <= 0``, ``decay`` or ``pretrained_scale`` outside (0, 1].
    """
    if base_lr <= 0 or not 0.0 < decay <= 1.0 or not 0.0 < pretrained_scale <= 1.0:
        raise ValueError(
            f"base_lr > 0, decay and pretrained_scale in (0, 1] expected, got {base_lr}, {decay}, {pretrained_scale}"
        )
    depths = encoder_depths(model, kind)
    n = 1 + max(depths.values(), default=-1)
    by_level: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        by_level.setdefault(depths.get(name, n), []).append((name, p))
    groups = []
    for level in sorted(by_level, reverse=True):
        scale = decay ** (n - level)
        parts = [("head" if level == n else f"encoder.depth{level}", by_level[level])]
        if pretrained is not None and level == n:  # the head level: a pretrained decoder vs the new layers
            parts = [("head", [(k, p) for k, p in by_level[level] if not k.startswith(pretrained)]),
                     ("decoder", [(k, p) for k, p in by_level[level] if k.startswith(pretrained)])]
        for name, members in parts:
            if not members:
                continue
            is_pre = pretrained is not None and name != "head"
            lr_scale = scale * (pretrained_scale if is_pre else 1.0)
            group = {
                "params": [p for _, p in members],
                "param_names": [k for k, _ in members],
                "lr": base_lr * lr_scale,
                "lr_scale": lr_scale,
                "depth": level,
                "name": name,
                "encoder": level != n,
            }
            if pretrained is not None:
                group["pretrained"] = is_pre
            groups.append(group)
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
