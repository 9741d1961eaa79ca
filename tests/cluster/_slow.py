"""A SimCLR pretraining slow enough for a test to signal it mid-run on the local SLURM cluster (the real method,
loss and augmentation; only a sleep before each forward). Pipeline targets::

    pretrain: {method: "tests.cluster._slow:slow_simclr", augment: "tests.cluster._slow:simclr_augment",
               method_kwargs: {delay_s: 0.4, ...}}
"""

from __future__ import annotations

import time
from typing import Any

import torch

from medssl.methods.simclr import SimCLR
from medssl.networks.encoders import Encoder
from medssl.transforms.batched import BatchedSSLAugment

__all__ = ["SlowSimCLR", "simclr_augment", "slow_simclr"]


class SlowSimCLR(SimCLR):
    """:class:`SimCLR` that sleeps ``delay_s`` seconds before each forward (same parameters, same losses)."""

    def __init__(self, encoder: Encoder, delay_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(encoder, **kwargs)
        self.delay_s = float(delay_s)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        time.sleep(self.delay_s)
        return super().forward(batch)


def slow_simclr(encoder: Encoder, delay_s: float = 0.0, **kwargs: Any) -> SlowSimCLR:
    return SlowSimCLR(encoder, delay_s, **kwargs)


def simclr_augment(method: str, roi_size: tuple[int, int, int], seed: int = 0, **kwargs: Any) -> BatchedSSLAugment:
    """SimCLR's view preset (the config's ``method`` names this module, which the presets do not know)."""
    return BatchedSSLAugment.for_method("simclr", roi_size, seed=seed, **kwargs)
