"""Key layout of the downstream networks: which state-dict keys are encoder / pretrained decoder (per SSL
encoder family: ``unet`` pretrains the BasicUNet decoder, ``segresnet_unet`` the SegResNet one, ``monai_unet``
the MONAI UNet one), and
each encoder parameter's depth level (0 = stem), as tabulated in :mod:`medssl.networks.downstream`.

Used by :mod:`medssl.networks.downstream`, :mod:`medssl.networks.finetune_opts` and the weight
transfer; every public name here is re-exported by :mod:`medssl.networks.downstream`.
"""

from __future__ import annotations

import re

from torch import nn

from medssl.networks.encoders_unet import unet_key_prefixes

__all__ = [
    "ENCODER_FAMILY",
    "DOWNSTREAM_KINDS",
    "encoder_prefix",
    "encoder_key_prefixes",
    "is_encoder_key",
    "encoder_keys",
    "decoder_key_prefixes",
    "transfer_key_prefixes",
    "transfer_keys",
    "encoder_depths",
]

#: downstream kind → the encoder family (``medssl.networks.encoders.ENCODERS`` name) it pairs with
ENCODER_FAMILY: dict[str, str] = {
    "SwinUNETR": "swinvit",
    "UNETR": "vit",
    "SegResNet": "segresnet",
    "ResNet": "resnet3d",
    "BasicUNet": "unet",
    "UNet": "monai_unet",
}
DOWNSTREAM_KINDS: tuple[str, ...] = tuple(ENCODER_FAMILY)

# prefix added to the wrapped MONAI net's keys (``Encoder.downstream[kind]``)
_KEY_PREFIX = {"SwinUNETR": "swinViT.", "UNETR": "vit.", "SegResNet": "", "ResNet": "", "BasicUNet": "", "UNet": ""}
# keys of the downstream net that belong to the encoder
_ENCODER_PREFIXES = {
    "SwinUNETR": ("swinViT.",),
    "UNETR": ("vit.",),
    "SegResNet": ("convInit.", "down_layers."),
    "ResNet": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
    "BasicUNet": ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
    "UNet": unet_key_prefixes("encoder"),  # every down block + the bottom block, at any depth
}
# pretrained decoder keys per (kind, SSL encoder family): transferred with the encoder, trained like the head
# (Models Genesis's BasicUNet; SparK's whole SegResNet U-Net). A kind's default family pretrains no decoder
# unless listed here (``segresnet`` is the encoder half only).
_DECODER_PREFIXES = {
    ("BasicUNet", "unet"): ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1."),
    ("SegResNet", "segresnet_unet"): ("up_samples.", "up_layers."),
    ("UNet", "monai_unet"): unet_key_prefixes("decoder"),  # every up block but the top one (model.2., the head)
}


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


def decoder_key_prefixes(kind: str, family: str | None = None) -> tuple[str, ...]:
    """Key prefixes of ``kind``'s decoder that an SSL encoder of ``family`` pretrains (empty: none).

    Args:
        kind: downstream kind.
        family: the checkpoint's encoder family (``Encoder.name``); ``None`` = ``kind``'s default family
            (:data:`ENCODER_FAMILY`). BasicUNet ← ``unet``: ``upcat_4..1``; SegResNet ← ``segresnet_unet``:
            ``up_samples``, ``up_layers``; UNet ← ``monai_unet``: every up block but the top ``model.2``; every
            other pair: ``()``.
    """
    _check_kind(kind)
    return _DECODER_PREFIXES.get((kind, family or ENCODER_FAMILY[kind]), ())


def transfer_key_prefixes(kind: str, family: str | None = None) -> tuple[str, ...]:
    """Key prefixes an SSL checkpoint of ``family`` fills: the encoder's, plus a pretrained decoder's."""
    return encoder_key_prefixes(kind) + decoder_key_prefixes(kind, family)


def transfer_keys(model: nn.Module, kind: str, family: str | None = None) -> list[str]:
    """State-dict keys of ``model`` an SSL checkpoint of encoder ``family`` (default: ``kind``'s default
    family) must fill, in module order; everything else is new."""
    prefixes = transfer_key_prefixes(kind, family)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def encoder_depths(model: nn.Module, kind: str) -> dict[str, int]:
    """Depth level (0 = stem) of every encoder parameter of ``model``; decoder/head ones are absent.

    Levels per kind are tabulated in :mod:`medssl.networks.downstream`; UNETR's final ``vit.norm`` sits
    one level above the last block (``num_blocks + 1``), a SwinUNETR v2 stage's ``layers{i}c`` shares
    the level of ``layers{i}``.
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
    if kind == "UNet":  # down_i at P_i = "model." + "1.submodule." * i, the bottom block at P_n: level = nesting
        return key.count("1.submodule.")
    m = re.match(r"layer(\d)\.", key)  # ResNet: conv1/bn1 are the stem
    return int(m.group(1)) if m else 0
