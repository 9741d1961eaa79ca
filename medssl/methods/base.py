"""Base class and registry of SSL methods.

A method is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": scalar, <logs>}`` (see
docs/CONTRACTS.md "SSL batch"). Logs are detached 0-dim tensors (``float()``-able; kept on device so the
engine decides when to synchronise). Methods never log to MLflow: the engine does.

The transferable weights are the ``encoder.`` entries of a method's state dict; with the encoder's
recipe: ``enc = rebuild_encoder(recipe); enc.load_state_dict({k[len("encoder."):]: v for k, v in
sd.items() if k.startswith("encoder.")})``, then ``enc.export_state_dict("SwinUNETR")`` etc.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
from torch import nn

from medssl.networks.encoders import Encoder

__all__ = ["SSLMethod", "METHODS", "build_method"]

# name → "module:Class"; imported lazily so that importing one method never imports all of them
_REGISTRY: dict[str, str] = {
    "simclr": "medssl.methods.simclr:SimCLR",
    "triplet": "medssl.methods.triplet:TripletView",
    "rotation": "medssl.methods.rotation:RotationPrediction",
    "mae": "medssl.methods.mae:MAE",
    "genesis": "medssl.methods.genesis:ModelsGenesis",
    "swin": "medssl.methods.swin:SwinPretrain",
    "vicreg": "medssl.methods.vicreg:VICReg",
    "byol": "medssl.methods.byol:BYOL",
    "spark": "medssl.methods.spark:SparK",
}
METHODS: tuple[str, ...] = tuple(_REGISTRY)


class SSLMethod(nn.Module):
    """Base of every SSL method: holds ``encoder`` (the module whose weights are transferred).

    Subclasses set ``name`` and ``required_keys`` and implement :meth:`forward`, calling
    :meth:`check_batch` first.

    Args:
        encoder: a :class:`medssl.networks.encoders.Encoder`.
    """

    name: ClassVar[str] = ""
    required_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise ValueError(f"{type(self).__name__} needs a medssl Encoder, got {type(encoder).__name__}")
        self.encoder = encoder

    def check_batch(self, batch: dict[str, Any], extra: frozenset[str] | set[str] = frozenset()) -> None:
        """Raise ``KeyError`` naming the method and the missing keys, ``ValueError`` on bad view shapes."""
        missing = sorted((self.required_keys | set(extra)) - set(batch))
        if missing:
            raise KeyError(f"method {self.name!r} needs batch key(s) {missing}; batch has {sorted(batch)}")
        for k in ("view1", "view2", "view1_target", "view2_target"):
            if k in batch and (not isinstance(batch[k], torch.Tensor) or batch[k].ndim != 5):
                shape = (
                    tuple(batch[k].shape) if isinstance(batch[k], torch.Tensor) else type(batch[k]).__name__
                )
                raise ValueError(f"method {self.name!r}: batch[{k!r}] must be (B, C, D, H, W), got {shape}")
        if "view2" in batch and "view1" in batch and batch["view1"].shape != batch["view2"].shape:
            raise ValueError(
                f"method {self.name!r}: view1 {tuple(batch['view1'].shape)} and view2 "
                f"{tuple(batch['view2'].shape)} differ in shape"
            )

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook the engine calls after each optimizer step (e.g. BYOL's EMA update). Default: nothing.

        Args:
            step: optimizer steps done so far (1 after the first step).
            total_steps: planned number of optimizer steps.
        """

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def build_method(name: str, encoder: Encoder, **kwargs: Any) -> SSLMethod:
    """Build the SSL method ``name`` around ``encoder``; ``kwargs`` go to its constructor.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown SSL method {name!r}; known: {', '.join(METHODS)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(encoder, **kwargs)
