"""Small test doubles for the engine: a tiny conv encoder, a toy loss method and a torch augmentation.

They follow the real interfaces (encoder ``.recipe``; ``method(batch) -> {"loss", logs}`` with
``on_step_end``; ``augment(images) -> batch dict``) and are importable as ``tests.engines._toys:...``
targets of a :class:`~medssl.config.PretrainConfig`.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyEncoder", "ToyMethod", "ToyAugment", "tiny_encoder", "toy_method", "toy_augment"]


class TinyEncoder(nn.Module):
    """Two 3D convs + global average: ``(B, C, D, H, W)`` → ``(B, width)``."""

    def __init__(
        self, in_channels: int = 1, img_size: tuple[int, ...] = (16, 16, 16), width: int = 4
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.recipe = {
            "name": "tiny",
            "class": "TinyEncoder",
            "kwargs": {"width": width, "in_channels": in_channels},
            "img_size": list(img_size),
        }
        self.downstream = {"TinyNet": "encoder."}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3, 4))


class ToyMethod(nn.Module):
    """Predicts each sample's mean intensity from the view1 feature (per-sample MSE, so grad accumulation
    is exactly equivalent). Returns NaN on the forward calls listed in ``nan_calls`` (0-based).
    ``$TOY_DELAY_S`` sleeps in every forward (lets a test kill the process mid-step)."""

    def __init__(self, encoder: nn.Module, nan_calls: tuple[int, ...] = (), dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4, 1))
        self.nan_calls = set(nan_calls)
        self.calls = 0
        self.step_end: list[tuple[int, int]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delay = float(os.environ.get("TOY_DELAY_S", "0"))
        if delay:
            time.sleep(delay)
        pred = self.head(self.encoder(batch["view1"]))[:, 0]  # (B,)
        target = 10 * batch["view1_target"].mean(dim=(1, 2, 3, 4))  # (B,), O(1) loss values
        loss = ((pred - target) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss": loss, "pred_mean": pred.detach().mean()}

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step_end.append((step, total_steps))


class ToyAugment:
    """Each volume zero-padded/cut to ``roi_size`` (per sample, so batches can be split), then
    view1 = volume + noise (own ``torch.Generator``), view2 = flipped volume, targets = volumes."""

    def __init__(self, roi_size: tuple[int, ...], seed: int = 0, noise: float = 0.1) -> None:
        self.roi = tuple(int(r) for r in roi_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.noise = noise

    def __call__(self, volumes: list[torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        fixed = []
        for v in volumes:  # (C, D, H, W)
            pad = [
                p
                for s, r in zip(reversed(v.shape[1:]), reversed(self.roi), strict=True)
                for p in (0, max(0, r - s))
            ]
            fixed.append(F.pad(v, pad)[:, : self.roi[0], : self.roi[1], : self.roi[2]])
        images = torch.stack(fixed)  # (B, C, *roi)
        eps = torch.randn(images.shape, generator=self.generator).to(images.device)
        return {
            "view1": images + self.noise * eps,
            "view1_target": images,
            "view2": images.flip(-1),
            "view2_target": images.flip(-1),
            "view1_mask": (eps > 1.5).float(),
        }


def tiny_encoder(
    in_channels: int = 1, img_size: tuple[int, ...] = (16, 16, 16), width: int = 4
) -> TinyEncoder:
    return TinyEncoder(in_channels, img_size, width)


def toy_method(encoder: nn.Module, **kwargs) -> ToyMethod:
    return ToyMethod(encoder, **kwargs)


def toy_augment(method: str, roi_size: tuple[int, ...], seed: int = 0, noise: float = 0.1) -> ToyAugment:
    return ToyAugment(roi_size, seed, noise)
