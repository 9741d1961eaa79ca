"""Test-time flips for validation / test scoring (``FinetuneConfig.tta``), as nnU-Net mirrors at inference.

:class:`FlipTTAInferer` wraps an inferer (MONAI ``SlidingWindowInferer``): it runs the volume as is and flipped
along every non-empty combination of the allowed axes, undoes each flip on the output, averages the softmax
probabilities and returns their log, so code that takes the argmax of "logits" (or resamples them before the
argmax, :mod:`medssl.engines.finetune.native`) is unchanged. Only axes the training augmentation flipped are
allowed (``augment.flip_axes``): a flip the model never saw can swap left/right or anterior/posterior classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import torch

__all__ = ["flip_dims", "FlipTTAInferer"]


def flip_dims(flip_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor dims of a ``(B, C, X, Y, Z)`` batch for every non-empty combination of the spatial
    ``flip_axes``: ``[0]`` → ``[(2,)]``; ``[0, 2]`` → ``[(2,), (4,), (2, 4)]``.

    Raises:
        ValueError: an axis outside 0..2.
    """
    axes = sorted({int(a) for a in flip_axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"flip axes must be spatial axes 0..2, got {list(flip_axes)}")
    return [tuple(2 + a for a in combo) for r in range(1, len(axes) + 1) for combo in combinations(axes, r)]


class FlipTTAInferer:
    """``inferer(x, model)`` averaged over test-time flips; returns ``log`` of the mean softmax ``(B, K, ...)``.

    Args:
        inferer: the wrapped inferer, called as ``inferer(x, model)``.
        flip_axes: spatial axes (0..2 of ``(X, Y, Z)``) the flips may use; empty = no flips (log-softmax only).
    """

    def __init__(self, inferer: Callable[..., Any], flip_axes: Sequence[int]) -> None:
        self.inferer = inferer
        self.dims = flip_dims(flip_axes)

    def __call__(self, x: torch.Tensor, model: Callable[..., Any]) -> torch.Tensor:
        total = torch.softmax(torch.as_tensor(self.inferer(x, model)).float(), dim=1)
        for dims in self.dims:
            out = torch.as_tensor(self.inferer(torch.flip(x, dims), model)).float()
            total = total + torch.flip(torch.softmax(out, dim=1), dims)
        return torch.log((total / (1 + len(self.dims))).clamp_min(1e-12))
