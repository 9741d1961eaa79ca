"""The :class:`Encoder` base class shared by every SSL encoder family.

The interface (``forward``, ``forward_features``, ``feature_dim``, ``recipe``, ``downstream``,
``export_state_dict``) is described in :mod:`medssl.networks.encoders`, which also holds the
registry; the families live in :mod:`medssl.networks.encoders_vit` and
:mod:`medssl.networks.encoders_cnn`. This module imports none of them (no import cycle).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["Encoder"]


def _jsonable(v: Any) -> Any:
    """Tuples → lists (recursively) so a recipe survives a JSON round trip unchanged."""
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class Encoder(nn.Module):
    """Base class: a MONAI network ``net`` plus the metadata needed to transfer its weights.

    Subclasses build ``self.net`` from the MONAI constructor arguments ``kwargs`` and implement
    :meth:`forward_features`.

    Args:
        kwargs: constructor arguments of the wrapped MONAI class (JSON-serialisable).
        img_size: training crop size ``(D, H, W)`` in voxels, recorded in the recipe.
    """

    name: str = ""
    monai_class: str = ""
    exclude_prefixes: tuple[str, ...] = ()  # keys of ``net`` that are not encoder weights

    def __init__(self, kwargs: dict[str, Any], img_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.kwargs = _jsonable(dict(kwargs))
        self.img_size = tuple(int(s) for s in ensure_tuple_rep(img_size, 3))
        self.feature_channels: list[int] = []
        self.downstream: dict[str, str] = {}
        self.downstream_kwargs: dict[str, dict[str, Any]] = {}

    @property
    def feature_dim(self) -> int:
        """Size of the global feature returned by :meth:`forward`."""
        return self.feature_channels[-1]

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder: ``rebuild_encoder(enc.recipe)``."""
        return {
            "name": self.name,
            "class": self.monai_class,
            "kwargs": copy.deepcopy(self.kwargs),
            "img_size": list(self.img_size),
            "downstream_kwargs": copy.deepcopy(self.downstream_kwargs),
        }

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps ``[(B, C_i, D_i, H_i, W_i)]``, shallow → deep."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global feature: ``(B, C, D, H, W)`` → ``(B, feature_dim)`` by averaging the deepest map."""
        return self.forward_features(x)[-1].mean(dim=(2, 3, 4))

    def export_state_dict(self, target: str) -> dict[str, torch.Tensor]:
        """Encoder weights keyed exactly as the downstream network ``target`` names them.

        Args:
            target: a key of :attr:`downstream`, e.g. ``"SwinUNETR"``.

        Raises:
            ValueError: ``target`` is not a known downstream network for this encoder.
        """
        if target not in self.downstream:
            raise ValueError(
                f"encoder {self.name!r} cannot export to {target!r}; known targets: {sorted(self.downstream)}"
            )
        prefix = self.downstream[target]
        return {
            prefix + k: v
            for k, v in self.net.state_dict().items()
            if not any(k.startswith(p) for p in self.exclude_prefixes)
        }
