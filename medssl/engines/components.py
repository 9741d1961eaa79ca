"""Build the pieces of a pretraining run from a config: device, encoder, method, augmentation, recipe.

Names resolve through medssl's registries (``medssl.networks.encoders.build_encoder``,
``medssl.methods.base.build_method``, ``medssl.transforms.batched.BatchedSSLAugment.for_method``),
imported lazily; a ``"package.module:callable"`` string is imported instead (bundle-style targets,
e.g. test doubles or a user's own method).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from medssl.config import PretrainConfig
from medssl.engines import checkpoint as ck
from medssl.errors import MedsslError

__all__ = ["resolve_device", "build_components", "make_recipe"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _import(target: str) -> Callable:
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for a in attr.split("."):
            obj = getattr(obj, a)
    except (ImportError, AttributeError) as e:
        raise MedsslError(f"cannot import {target!r}: {e}") from e
    return obj


def build_components(config: PretrainConfig) -> tuple[torch.nn.Module, torch.nn.Module, Callable]:
    """Encoder, method and batched augmentation from the config (names, or ``"module:callable"`` targets).

    Returns:
        ``(encoder, method, augment)`` where ``augment(images (B, C, D, H, W)) -> batch dict``.
    """
    try:
        return _build_components(config)
    except (ValueError, KeyError, TypeError) as e:
        raise MedsslError(f"cannot build method {config.method!r} / encoder {config.encoder!r}: {e}") from e


def _build_components(config: PretrainConfig) -> tuple[torch.nn.Module, torch.nn.Module, Callable]:
    roi = tuple(config.roi_size)
    if ":" in config.encoder:
        encoder = _import(config.encoder)(
            in_channels=config.in_channels, img_size=roi, **config.encoder_kwargs
        )
    else:
        from medssl.networks.encoders import build_encoder

        encoder = build_encoder(
            config.encoder, in_channels=config.in_channels, img_size=roi, **config.encoder_kwargs
        )
    if ":" in config.method:
        method = _import(config.method)(encoder, **config.method_kwargs)
    else:
        from medssl.methods.base import build_method

        method = build_method(config.method, encoder, **config.method_kwargs)
    if config.augment:
        augment = _import(config.augment)(config.method, roi, seed=config.seed, **config.augment_kwargs)
    else:
        from medssl.transforms.batched import BatchedSSLAugment

        augment = BatchedSSLAugment.for_method(config.method, roi, seed=config.seed, **config.augment_kwargs)
    return encoder, method, augment


def make_recipe(config: PretrainConfig, encoder: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint recipe: everything needed to rebuild and feed the encoder elsewhere."""
    enc = getattr(encoder, "recipe", None) or {"name": config.encoder, "kwargs": dict(config.encoder_kwargs)}
    return {
        "encoder": enc,
        "method": config.method,
        "method_kwargs": dict(config.method_kwargs),
        "in_channels": config.in_channels,
        "roi_size": list(config.roi_size),
        "source_size": config.source_size,
        "target_spacing": config.target_spacing,
        "normalisation": config.normalisation,
        "ct_window": list(config.ct_window),
        "versions": ck.library_versions(),
    }
