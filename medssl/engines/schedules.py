"""Learning-rate (and any scalar) schedules as pure functions of the optimizer step.

As in DINO / nanoGPT, a schedule is a function of the iteration only, so resuming at step ``t`` needs
nothing but ``t``. :class:`WarmupCosineSchedule` wraps it for an optimizer with the usual
``step()`` / ``state_dict()`` so it fits the checkpoint dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["warmup_cosine", "WarmupCosineSchedule"]


def warmup_cosine(
    step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0
) -> float:
    """Linear warm-up from ``start`` to ``base`` then cosine decay from ``base`` to ``final``.

    ``step`` counts optimizer steps from 0; the value at ``step`` is the one used *for* that step.
    Warm-up: ``start + (base - start) * (step + 1) / warmup_steps`` for ``step < warmup_steps``
    (so the last warm-up step reaches ``base``). Then, with ``t = (step - warmup_steps) /
    max(1, total_steps - warmup_steps)`` clamped to [0, 1]: ``final + (base - final) * (1 + cos(pi t)) / 2``.

    Example: ``base=1.0, final=0.0, total_steps=10, warmup_steps=2`` gives
    0.5, 1.0 (warm-up), 1.0 at step 2, 0.5 at step 6 (half-way through the 8 cosine steps), → 0 at step 10.

    Args:
        step: optimizer step, >= 0.
        base: peak value (e.g. the learning rate).
        final: value at the end of the decay.
        total_steps: total optimizer steps including warm-up.
        warmup_steps: linear warm-up length.
        start: value warm-up starts from.

    Returns:
        The scheduled value (float).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return start + (base - start) * (step + 1) / warmup_steps
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosineSchedule:
    """Sets ``lr`` of every param group from :func:`warmup_cosine` at the current step.

    Call :meth:`apply` before the optimizer step ``t`` (it sets the lr for ``t``), :meth:`step`
    after it. Param groups may carry ``lr_scale`` (e.g. layer-wise decay), multiplied in.

    Args:
        optimizer: the optimizer whose groups are scheduled.
        base_lr: peak learning rate.
        min_lr: final learning rate.
        total_steps: optimizer steps of the whole run.
        warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
    ) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"total_steps >= 1 and warmup_steps >= 0 expected, got {total_steps}, {warmup_steps}"
            )
        self.optimizer = optimizer
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.last_step = 0

    def value(self, step: int) -> float:
        """Learning rate for optimizer step ``step``."""
        return warmup_cosine(step, self.base_lr, self.min_lr, self.total_steps, self.warmup_steps)

    def apply(self) -> float:
        """Write the lr of the current step into the optimizer; returns it."""
        lr = self.value(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        """Advance to the next optimizer step."""
        self.last_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "min_lr": self.min_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        for k in ("base_lr", "min_lr"):
            setattr(self, k, float(state.get(k, getattr(self, k))))
        for k in ("total_steps", "warmup_steps"):
            setattr(self, k, int(state.get(k, getattr(self, k))))
