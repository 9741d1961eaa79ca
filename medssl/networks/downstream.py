"""Downstream (finetuning) networks whose encoder part matches an SSL encoder exactly.

Five MONAI networks are supported, each paired with one encoder family of
:mod:`medssl.networks.encoders`:

- ``SwinUNETR`` ← ``swinvit``: encoder keys ``swinViT.*``; depth levels 0 ``patch_embed``,
  1..4 ``layers1..4`` (a v2 stage's ``layers{i}c`` shares level i).
- ``UNETR`` ← ``vit``: ``vit.*``; 0 ``patch_embedding``, i+1 ``blocks.i``, L+1 the final ``norm``.
- ``SegResNet`` ← ``segresnet``: ``convInit.*`` and ``down_layers.*``; 0 ``convInit``, i+1
  ``down_layers.i``.
- ``ResNet`` ← ``resnet3d``: everything but the classifier ``fc.*``; 0 ``conv1``/``bn1``, i ``layer{i}``.
- ``BasicUNet`` ← ``unet`` (Models Genesis): ``conv_0.*``, ``down_1..4.*``; 0 ``conv_0``, i ``down_i``.
  Genesis transfers its whole U-Net, so the decoder ``upcat_4..1.*`` is pretrained too
  (:func:`transfer_keys`: loaded, reported, counted in the match share) but trains as part of the head
  (not frozen, head lr, no warm-up). Only ``final_conv.*`` is new.

Depth levels drive layer-wise LR decay (:func:`layerwise_lr_groups`); the decoder / head is one level
above the deepest encoder level.

:func:`build_downstream` builds the network either from an encoder recipe (SSL initialisation: the
recipe's ``downstream_kwargs`` fix every encoder-shaping argument) or, for training from scratch, from the
encoder family's own ``build`` arguments passed as plain kwargs: both paths go through the same recipe,
so scratch and SSL runs differ only in the initial weights.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from typing import Any

import torch
from monai.networks.nets import UNETR, BasicUNet, ResNet, SegResNet, SwinUNETR
from torch import nn

from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.encoders import ENCODERS, build_encoder

__all__ = [
    "DOWNSTREAM_KINDS",
    "ENCODER_FAMILY",
    "build_downstream",
    "scratch_recipe",
    "encoder_prefix",
    "encoder_key_prefixes",
    "is_encoder_key",
    "encoder_keys",
    "decoder_key_prefixes",
    "transfer_key_prefixes",
    "transfer_keys",
    "encoder_depths",
    "downstream_features",
    "freeze_encoder",
    "layerwise_lr_groups",
    "EncoderWarmup",
]

logger = logging.getLogger(__name__)

#: downstream kind → the encoder family (``medssl.networks.encoders.ENCODERS`` name) it pairs with
ENCODER_FAMILY: dict[str, str] = {
    "SwinUNETR": "swinvit",
    "UNETR": "vit",
    "SegResNet": "segresnet",
    "ResNet": "resnet3d",
    "BasicUNet": "unet",
}
DOWNSTREAM_KINDS: tuple[str, ...] = tuple(ENCODER_FAMILY)

_CLASSES: dict[str, type[nn.Module]] = {
    "SwinUNETR": SwinUNETR,
    "UNETR": UNETR,
    "SegResNet": SegResNet,
    "ResNet": ResNet,
    "BasicUNet": BasicUNet,
}
# prefix added to the wrapped MONAI net's keys (``Encoder.downstream[kind]``)
_KEY_PREFIX = {"SwinUNETR": "swinViT.", "UNETR": "vit.", "SegResNet": "", "ResNet": "", "BasicUNet": ""}
# keys of the downstream net that belong to the encoder
_ENCODER_PREFIXES = {
    "SwinUNETR": ("swinViT.",),
    "UNETR": ("vit.",),
    "SegResNet": ("convInit.", "down_layers."),
    "ResNet": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
    "BasicUNet": ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
}
# pretrained decoder keys: transferred with the encoder, trained like the head (Models Genesis)
_DECODER_PREFIXES = {"BasicUNet": ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.")}


def _check_kind(kind: str) -> None:
    if kind not in ENCODER_FAMILY:
        raise ValueError(f"unknown downstream network {kind!r}; known: {', '.join(DOWNSTREAM_KINDS)}")


def encoder_prefix(kind: str) -> str:
    """Prefix that turns the wrapped encoder net's keys into ``kind``'s keys (``"swinViT."`` for SwinUNETR)."""
    _check_kind(kind)
    return _KEY_PREFIX[kind]


def encoder_key_prefixes(kind: str) -> tuple[str, ...]:
    """Key prefixes of ``kind``'s state dict that belong to the encoder (the transferable part)."""
    _check_kind(kind)
    return _ENCODER_PREFIXES[kind]


def is_encoder_key(key: str, kind: str) -> bool:
    """Whether a state-dict (or parameter) name of a ``kind`` network belongs to its encoder."""
    return key.startswith(encoder_key_prefixes(kind))


def encoder_keys(model: nn.Module, kind: str) -> list[str]:
    """State-dict keys (parameters and persistent buffers) of ``model``'s encoder part, in module order."""
    return [k for k in model.state_dict() if is_encoder_key(k, kind)]


def decoder_key_prefixes(kind: str) -> tuple[str, ...]:
    """Key prefixes of ``kind``'s pretrained decoder (BasicUNet ``upcat_*``; empty for the other kinds)."""
    _check_kind(kind)
    return _DECODER_PREFIXES.get(kind, ())


def transfer_key_prefixes(kind: str) -> tuple[str, ...]:
    """Key prefixes an SSL checkpoint fills: the encoder's, plus the pretrained decoder's (BasicUNet)."""
    return encoder_key_prefixes(kind) + decoder_key_prefixes(kind)


def transfer_keys(model: nn.Module, kind: str) -> list[str]:
    """State-dict keys of ``model`` an SSL checkpoint must fill, in module order (everything else is new)."""
    prefixes = transfer_key_prefixes(kind)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def encoder_depths(model: nn.Module, kind: str) -> dict[str, int]:
    """Depth level (0 = stem) of every encoder parameter of ``model``; decoder/head ones are absent.

    Levels per kind are in the module table; UNETR's final ``vit.norm`` sits one level above the last
    block (``num_blocks + 1``), a SwinUNETR v2 stage's ``layers{i}c`` shares the level of ``layers{i}``.
    """
    _check_kind(kind)
    n_blocks = len(model.vit.blocks) if kind == "UNETR" else 0
    depths = {}
    for key, _ in model.named_parameters():
        if is_encoder_key(key, kind):
            depths[key] = _depth(key, kind, n_blocks)
    return depths


def _depth(key: str, kind: str, n_blocks: int) -> int:
    if kind == "SwinUNETR":
        m = re.match(r"swinViT\.layers(\d+)", key)
        return int(m.group(1)) if m else 0  # patch_embed
    if kind == "UNETR":
        m = re.match(r"vit\.blocks\.(\d+)\.", key)
        if m:
            return int(m.group(1)) + 1
        return 0 if key.startswith("vit.patch_embedding.") else n_blocks + 1  # final norm
    if kind == "SegResNet":
        m = re.match(r"down_layers\.(\d+)\.", key)
        return int(m.group(1)) + 1 if m else 0
    if kind == "BasicUNet":
        m = re.match(r"down_(\d)\.", key)
        return int(m.group(1)) if m else 0  # conv_0
    m = re.match(r"layer(\d)\.", key)  # ResNet: conv1/bn1 are the stem
    return int(m.group(1)) if m else 0


def scratch_recipe(kind: str, **encoder_kwargs: Any) -> dict[str, Any]:
    """The encoder recipe a from-scratch ``kind`` network is built from.

    Args:
        kind: one of :data:`DOWNSTREAM_KINDS`.
        encoder_kwargs: arguments of the paired encoder family's ``build`` (``in_channels``,
            ``img_size`` ``(D, H, W)`` in voxels, ``feature_size`` …), exactly as pretraining takes them.
    """
    _check_kind(kind)
    return build_encoder(ENCODER_FAMILY[kind], **encoder_kwargs).recipe


def _encoder_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Accept an encoder recipe or a checkpoint recipe holding it under ``"encoder"``."""
    if "downstream_kwargs" not in recipe and isinstance(recipe.get("encoder"), dict):
        return recipe["encoder"]
    return recipe


def build_downstream(
    kind: str, *, recipe: dict[str, Any] | None = None, out_channels: int, **kwargs: Any
) -> nn.Module:
    """Build a downstream network whose encoder part is exactly the SSL encoder's architecture.

    Args:
        kind: ``"SwinUNETR"``, ``"UNETR"``, ``"SegResNet"``, ``"BasicUNet"`` (segmentation, output
            ``(B, out_channels, D, H, W)``) or ``"ResNet"`` (classifier, output ``(B, out_channels)``).
        recipe: the encoder recipe (``Encoder.recipe`` or a checkpoint recipe with it under ``"encoder"``)
            for SSL initialisation; ``None`` for training from scratch.
        out_channels: segmentation classes (incl. background) or classifier classes.
        kwargs: with a recipe, extra constructor arguments of the MONAI class that do not shape the
            encoder (e.g. ``norm_name`` of the SwinUNETR decoder); an encoder argument equal to the
            recipe's is accepted, a different one refused (BasicUNet: a default the recipe relies on,
            e.g. ``bias``, too). Without a recipe, the paired encoder family's ``build`` arguments
            (``in_channels``, ``img_size``, ``feature_size``, ``depth`` …) plus decoder/head arguments.

    Raises:
        ValueError: unknown ``kind`` or bad arguments.
        MedsslError: the recipe's encoder cannot initialise ``kind`` (names the kinds it can).
        ConfigMismatchError: a kwarg contradicts the recipe's encoder (names field and both values).
    """
    _check_kind(kind)
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    from_ssl = recipe is not None
    if recipe is None:
        family = ENCODERS[ENCODER_FAMILY[kind]]
        build_args = set(inspect.signature(family.build).parameters) - {"cls"}
        enc_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in build_args}
        recipe = scratch_recipe(kind, **enc_kwargs)
    enc = _encoder_recipe(recipe)
    fits = enc.get("downstream_kwargs", {})
    if kind not in fits:
        raise MedsslError(
            f"encoder {enc.get('name')!r} cannot initialise a {kind}; it transfers to: {sorted(fits) or 'none'}"
        )
    args = dict(fits[kind])
    if from_ssl and kind == "BasicUNet":  # the decoder is pretrained too: defaults shape it as well
        sig = inspect.signature(BasicUNet).parameters.items()
        args = {k: p.default for k, p in sig if k != "out_channels" and k not in args} | args
    clash = {
        k: (args[k], v)
        for k, v in kwargs.items()
        if k in args and json.dumps(args[k], default=str) != json.dumps(_listify(v), default=str)
    }
    if clash:
        raise ConfigMismatchError(clash, what=f"SSL encoder recipe vs {kind} arguments")
    args |= kwargs
    if kind == "ResNet":
        if kwargs.get("num_classes", out_channels) != out_channels:
            raise ValueError(
                f"ResNet: pass the class count as out_channels, got num_classes={kwargs['num_classes']}"
            )
        args |= {"num_classes": out_channels, "feed_forward": True}
    else:
        args["out_channels"] = out_channels
    if kind == "SegResNet":
        args.setdefault("spatial_dims", 3)
    try:
        model = _CLASSES[kind](**args)
    except TypeError as e:
        raise ValueError(f"bad arguments for {kind}: {e}") from e
    logger.debug("built %s with %s", kind, args)
    return model


def _listify(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    return v


def downstream_features(model: nn.Module, kind: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Multi-scale encoder maps of a downstream net, as ``Encoder.forward_features`` gives them.

    Args:
        model: a network built by :func:`build_downstream`.
        kind: its kind.
        x: input ``(B, C, D, H, W)``.

    Returns:
        ``[(B, C_i, D_i, H_i, W_i)]`` shallow → deep (UNETR: blocks ``L/4, L/2, 3L/4`` and the final
        normalised tokens reshaped onto the patch grid).
    """
    _check_kind(kind)
    if kind == "SwinUNETR":
        return list(model.swinViT(x, model.normalize))
    if kind == "UNETR":
        final, hidden = model.vit(x)
        n = len(model.vit.blocks)
        layers = sorted({min(n - 1, n * q // 4) for q in (1, 2, 3)})
        return [model.proj_feat(hidden[i]) for i in layers] + [model.proj_feat(final)]
    if kind == "SegResNet":
        return model.encode(x)[1]
    if kind == "BasicUNet":
        out = [model.conv_0(x)]
        for down in (model.down_1, model.down_2, model.down_3, model.down_4):
            out.append(down(out[-1]))
        return out
    x = model.act(model.bn1(model.conv1(x)))
    if not model.no_max_pool:
        x = model.maxpool(x)
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


def freeze_encoder(model: nn.Module, kind: str, *, freeze: bool = True) -> list[str]:
    """Linear probe: ``requires_grad = not freeze`` on every encoder parameter of ``model``.

    Normalisation layers of the encoder still update their running statistics in ``train()`` mode;
    a strict linear probe also puts those modules in ``eval()`` mode. A pretrained decoder (BasicUNet
    ``upcat_*``) stays trainable with the head.

    Returns:
        Names of the parameters changed (all encoder parameters).
    """
    names = []
    for name, p in model.named_parameters():
        if is_encoder_key(name, kind):
            p.requires_grad_(not freeze)
            names.append(name)
    if not names:
        raise MedsslError(f"no encoder parameters found in this model for kind {kind!r}")
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
