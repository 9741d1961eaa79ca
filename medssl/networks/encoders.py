"""SSL encoders: MONAI networks wrapped with a uniform interface and a rebuildable recipe.

Every encoder holds the MONAI module it wraps as ``self.net`` and exposes

- ``forward(x)``: ``(B, C, D, H, W)`` → global feature ``(B, feature_dim)`` (mean over space / tokens);
- ``forward_features(x)``: multi-scale maps ``list[(B, C_i, D_i, H_i, W_i)]``, shallow → deep;
- ``feature_dim`` and ``feature_channels`` (channels of each map);
- ``recipe``: ``{"name", "class", "kwargs", "img_size", "downstream_kwargs"}``, JSON-serialisable,
  everything :func:`rebuild_encoder` needs (checkpoints embed it);
- ``downstream``: downstream MONAI class name → key prefix of the encoder weights in that network,
  and ``export_state_dict(target)`` giving the keys exactly as that network names them.

``downstream_kwargs`` in the recipe holds, per downstream class, the constructor arguments that make
its encoder part identical to this encoder (the task-specific ones, e.g. ``out_channels``, are left
to the caller), so ``networks/transfer.py`` can build a matching downstream net.

The base class is in :mod:`medssl.networks.encoder_base`, the families in
:mod:`medssl.networks.encoders_vit` (``swinvit``, ``vit``) and :mod:`medssl.networks.encoders_cnn`
(``segresnet``, ``segresnet_unet``, ``resnet3d``, ``unet``) and :mod:`medssl.networks.encoders_unet`
(``monai_unet``, the MONAI residual ``UNet``); all are re-exported here.
"""

from __future__ import annotations

from typing import Any

from monai.utils import ensure_tuple_rep

from medssl.networks.encoder_base import Encoder
from medssl.networks.encoders_cnn import ResNetEncoder, SegResNetEncoder, SegResNetUNetEncoder, UNetEncoder
from medssl.networks.encoders_unet import MonaiUNetEncoder
from medssl.networks.encoders_vit import SwinViTEncoder, ViTEncoder

__all__ = [
    "Encoder",
    "SwinViTEncoder",
    "ViTEncoder",
    "SegResNetEncoder",
    "SegResNetUNetEncoder",
    "ResNetEncoder",
    "UNetEncoder",
    "MonaiUNetEncoder",
    "ENCODERS",
    "build_encoder",
    "rebuild_encoder",
]


ENCODERS: dict[str, type[Encoder]] = {
    c.name: c
    for c in (
        SwinViTEncoder, ViTEncoder, SegResNetEncoder, SegResNetUNetEncoder, ResNetEncoder, UNetEncoder,
        MonaiUNetEncoder,
    )
}


def build_encoder(
    name: str, *, in_channels: int = 1, img_size: tuple[int, int, int] = (64, 64, 64), **kwargs: Any
) -> Encoder:
    """Build an encoder by name; ``kwargs`` are the family's ``build`` arguments (e.g. ``feature_size``).

    Args:
        name: one of :data:`ENCODERS` (``swinvit, vit, segresnet, segresnet_unet, resnet3d, unet,
            monai_unet``).
        in_channels: input channels ``C`` of ``(B, C, D, H, W)``.
        img_size: training crop ``(D, H, W)`` in voxels (the ViT position embedding depends on it).

    Raises:
        ValueError: unknown name, or invalid arguments for that family.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name].build(
        in_channels=in_channels, img_size=tuple(ensure_tuple_rep(img_size, 3)), **kwargs
    )


def rebuild_encoder(recipe: dict[str, Any]) -> Encoder:
    """Rebuild an encoder (fresh weights) from ``Encoder.recipe`` (e.g. read from a checkpoint).

    Raises:
        ValueError: the recipe names an unknown encoder or another MONAI class than expected.
    """
    name = recipe.get("name")
    if name not in ENCODERS:
        raise ValueError(f"recipe names unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    cls = ENCODERS[name]
    if recipe.get("class", cls.monai_class) != cls.monai_class:
        raise ValueError(f"recipe class {recipe.get('class')!r} != {cls.monai_class!r} for encoder {name!r}")
    return cls(dict(recipe["kwargs"]), tuple(recipe["img_size"]))
