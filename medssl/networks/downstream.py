"""Downstream (finetuning) networks whose encoder part matches an SSL encoder exactly.

Six MONAI networks are supported, each paired with one encoder family of
:mod:`medssl.networks.encoders`:

- ``SwinUNETR`` ← ``swinvit``: encoder keys ``swinViT.*``; depth levels 0 ``patch_embed``,
  1..4 ``layers1..4`` (a v2 stage's ``layers{i}c`` shares level i).
- ``UNETR`` ← ``vit``: ``vit.*``; 0 ``patch_embedding``, i+1 ``blocks.i``, L+1 the final ``norm``.
- ``SegResNet`` ← ``segresnet``: ``convInit.*`` and ``down_layers.*``; 0 ``convInit``, i+1
  ``down_layers.i``. ← ``segresnet_unet`` (SparK masked image modelling pretrains the whole U-Net): the same
  encoder, plus the decoder ``up_samples.*``/``up_layers.*`` pretrained and transferred, trained like
  Genesis's BasicUNet decoder (with the head: not frozen, base lr, no warm-up). Only ``conv_final.*`` is new.
- ``ResNet`` ← ``resnet3d``: everything but the classifier ``fc.*``; 0 ``conv1``/``bn1``, i ``layer{i}``.
- ``BasicUNet`` ← ``unet`` (Models Genesis): ``conv_0.*``, ``down_1..4.*``; 0 ``conv_0``, i ``down_i``.
  Genesis transfers its whole U-Net, so the decoder ``upcat_4..1.*`` is pretrained too
  (:func:`transfer_keys`: loaded, reported, counted in the match share) but trains as part of the head
  (not frozen, head lr, no warm-up). Only ``final_conv.*`` is new.
- ``UNet`` (MONAI, residual units) ← ``monai_unet`` (SparK): the whole U-Net is pretrained; encoder = every down
  block and the bottom block (level i = ``down_i``, n = the bottom), pretrained decoder = every up block but the
  top one; only the top up block ``model.2.*`` (the transposed conv to ``out_channels`` and its residual unit) is
  new. Key layout: :mod:`medssl.networks.encoders_unet`.

Depth levels drive layer-wise LR decay (:func:`layerwise_lr_groups`); the decoder / head is one level
above the deepest encoder level.

:func:`build_downstream` builds the network either from an encoder recipe (SSL initialisation: the
recipe's ``downstream_kwargs`` fix every encoder-shaping argument) or, for training from scratch, from the
encoder family's own ``build`` arguments passed as plain kwargs: both paths go through the same recipe,
so scratch and SSL runs differ only in the initial weights.

The key tables and depth levels live in :mod:`medssl.networks.downstream_keys`, the finetuning options
(:func:`freeze_encoder`, :func:`layerwise_lr_groups`, :class:`EncoderWarmup`) in
:mod:`medssl.networks.finetune_opts`; all are re-exported here.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

import torch
from monai.networks.nets import UNETR, BasicUNet, ResNet, SegResNet, SwinUNETR, UNet
from torch import nn

from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.downstream_keys import (
    DOWNSTREAM_KINDS,
    ENCODER_FAMILY,
    _check_kind,
    decoder_key_prefixes,
    encoder_depths,
    encoder_key_prefixes,
    encoder_keys,
    encoder_prefix,
    is_encoder_key,
    transfer_key_prefixes,
    transfer_keys,
)
from medssl.networks.encoders import ENCODERS, build_encoder
from medssl.networks.encoders_cnn import basicunet_features, resnet_features
from medssl.networks.encoders_unet import unet_features
from medssl.networks.finetune_opts import EncoderWarmup, freeze_encoder, layerwise_lr_groups

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

_CLASSES: dict[str, type[nn.Module]] = {
    "SwinUNETR": SwinUNETR,
    "UNETR": UNETR,
    "SegResNet": SegResNet,
    "ResNet": ResNet,
    "BasicUNet": BasicUNet,
    "UNet": UNet,
}


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
        kind: ``"SwinUNETR"``, ``"UNETR"``, ``"SegResNet"``, ``"BasicUNet"``, ``"UNet"`` (segmentation, output
            ``(B, out_channels, D, H, W)``) or ``"ResNet"`` (classifier, output ``(B, out_channels)``).
        recipe: the encoder recipe (``Encoder.recipe`` or a checkpoint recipe with it under ``"encoder"``)
            for SSL initialisation; ``None`` for training from scratch.
        out_channels: segmentation classes (incl. background) or classifier classes.
        kwargs: with a recipe, extra constructor arguments of the MONAI class that do not shape the
            encoder (e.g. ``norm_name`` of the SwinUNETR decoder); an encoder argument equal to the
            recipe's is accepted, a different one refused (with a pretrained decoder, BasicUNet from
            ``unet``, SegResNet from ``segresnet_unet`` or UNet from ``monai_unet``: a default the recipe
            relies on, e.g. ``bias`` or ``upsample_mode``, too). Without a recipe, the paired encoder family's ``build`` arguments
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
    if from_ssl and decoder_key_prefixes(kind, enc.get("name")):  # a pretrained decoder: defaults shape it too
        sig = inspect.signature(_CLASSES[kind]).parameters.items()
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
    if kind in ("SegResNet", "UNet"):
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
        return basicunet_features(model, x)
    if kind == "UNet":
        return unet_features(model, x)
    return resnet_features(model, x)
