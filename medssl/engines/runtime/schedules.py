"""Learning-rate (and any scalar) schedules as pure functions of the optimizer step.

As in DINO / nanoGPT, a schedule is a function of the iteration only, so resuming at step ``t`` needs
nothing but ``t``. :class:`WarmupCosineSchedule` wraps it for an optimizer with the usual
``step()`` / ``state_dict()`` so it fits the checkpoint dict.

The finetuning schedule of pretrained weights (``FinetuneConfig.ssl_schedule``: a frozen phase, then a linear
warm-up of the pretrained part's lr to ``encoder_lr_scale`` × the cosine) is normalised, resolved and
described here too (:func:`normalise_ssl_schedule`, :func:`resolve_ssl_schedule`, :func:`pretrained_lr_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from medssl.errors import MedsslError

__all__ = [
    "warmup_cosine",
    "WarmupCosineSchedule",
    "AUTO_SSL_SCHEDULE",
    "SSL_SCHEDULE_KEYS",
    "normalise_ssl_schedule",
    "resolve_ssl_schedule",
    "ssl_schedule_identity",
    "check_ssl_schedule_options",
    "pretrained_lr_factor",
]

#: keys of an explicit ``ssl_schedule`` mapping; missing ones take the ``auto`` value
SSL_SCHEDULE_KEYS = ("freeze_steps", "warmup_steps", "encoder_lr_scale", "llrd")
#: what ``ssl_schedule: auto`` means (recorded in the config hash, so changing it splits old and new runs):
#: frozen for ``max(min_steps, ceil(share × total))`` steps but at most a quarter of the run, then a linear
#: warm-up of the same length to ``encoder_lr_scale`` × the cosine lr, no layer-wise decay. Reasons: nnssl
#: (Wald et al., CVPR 2025) trains the new heads alone first, then warms the whole net up linearly; its
#: 1000-epoch budget spends ~1 % / ~5 % on them, our 400-step CPU budget gets 10 % each so the new decoder
#: learns something first. Scale 0.5 sits between nnssl's full lr after the warm-up (large data) and the lower
#: pretrained lr of MAE/BEiT LLRD recipes (0.65-0.75 per block); unmeasured here, see the ablation script
#: ``benchmarks/ssl_schedule_ablation.py``.
AUTO_SSL_SCHEDULE: dict[str, Any] = {
    "freeze_share": 0.1,
    "warmup_share": 0.1,
    "min_steps": 20,
    "max_share": 0.25,
    "encoder_lr_scale": 0.5,
    "llrd": None,
}


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
    after it. Param groups may carry ``lr_scale`` (e.g. layer-wise decay), multiplied in; groups with
    ``"pretrained": True`` are also multiplied by ``pretrained_factor(t)`` (the frozen phase and warm-up of
    an SSL init, :func:`pretrained_lr_factor`), a pure function of the step like the rest.

    Args:
        optimizer: the optimizer whose groups are scheduled.
        base_lr: peak learning rate.
        min_lr: final learning rate.
        total_steps: optimizer steps of the whole run.
        warmup_steps: linear warm-up steps.
        pretrained_factor: step → multiplier of the ``pretrained`` groups; ``None``: 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        pretrained_factor: Callable[[int], float] | None = None,
    ) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"total_steps >= 1 and warmup_steps >= 0 expected, got {total_steps}, {warmup_steps}"
            )
        self.optimizer = optimizer
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.last_step = 0
        self.pretrained_factor = pretrained_factor

    def value(self, step: int) -> float:
        """Learning rate for optimizer step ``step``."""
        return warmup_cosine(step, self.base_lr, self.min_lr, self.total_steps, self.warmup_steps)

    def apply(self) -> float:
        """Write the lr of the current step into the optimizer; returns it (the unscaled value)."""
        lr = self.value(self.last_step)
        ramp = self.pretrained_factor(self.last_step) if self.pretrained_factor is not None else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * (ramp if group.get("pretrained") else 1.0)
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


def pretrained_lr_factor(step: int, freeze_steps: int, warmup_steps: int) -> float:
    """Multiplier of the pretrained part's lr at optimizer step ``step`` (from 0).

    0 for ``step < freeze_steps`` (frozen), then ``(step - freeze_steps + 1) / warmup_steps`` while
    ``step < freeze_steps + warmup_steps`` (the last warm-up step reaches 1), then 1. Example: ``(2, 2)`` gives
    0, 0, 0.5, 1, 1, …
    """
    if step < freeze_steps:
        return 0.0
    if warmup_steps > 0 and step < freeze_steps + warmup_steps:
        return (step - freeze_steps + 1) / warmup_steps
    return 1.0


def _check_steps(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"ssl_schedule.{key} must be an int >= 0 or 'auto', got {value!r}")


def _check_scale(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"ssl_schedule.{key} must be a number in (0, 1], got {value!r}")


def normalise_ssl_schedule(value: Any) -> str | dict[str, Any]:
    """``"none"`` / ``"auto"`` (any case; ``None`` = ``"none"``) or the full mapping of an explicit schedule.

    A mapping may omit keys: ``freeze_steps`` / ``warmup_steps`` then stay ``"auto"`` (resolved at run start from
    the run's length), ``encoder_lr_scale`` / ``llrd`` take :data:`AUTO_SSL_SCHEDULE`'s values.

    Raises:
        ValueError: another string, an unknown key, or a value out of range (named).
    """
    if value is None:
        return "none"
    if isinstance(value, str):
        v = value.strip().lower()
        if v not in ("none", "auto"):
            raise ValueError(f"ssl_schedule must be 'auto', 'none' or a mapping of {SSL_SCHEDULE_KEYS}, got {value!r}")
        return v
    if not isinstance(value, dict):
        raise ValueError(f"ssl_schedule must be 'auto', 'none' or a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(SSL_SCHEDULE_KEYS))
    if unknown:
        raise ValueError(f"unknown ssl_schedule key(s) {unknown}; valid: {list(SSL_SCHEDULE_KEYS)}")
    out = {"freeze_steps": "auto", "warmup_steps": "auto",
           "encoder_lr_scale": AUTO_SSL_SCHEDULE["encoder_lr_scale"], "llrd": AUTO_SSL_SCHEDULE["llrd"]} | value
    for key in ("freeze_steps", "warmup_steps"):
        if isinstance(out[key], str) and out[key].strip().lower() == "auto":
            out[key] = "auto"
        else:
            _check_steps(key, out[key])
    _check_scale("encoder_lr_scale", out["encoder_lr_scale"])
    if out["llrd"] is not None:
        _check_scale("llrd", out["llrd"])
    return out


def _auto_steps(total_steps: int, share: float) -> int:
    a = AUTO_SSL_SCHEDULE
    return min(max(int(a["min_steps"]), math.ceil(share * total_steps)), int(a["max_share"] * total_steps))


def resolve_ssl_schedule(value: Any, *, total_steps: int, init_kind: str) -> dict[str, Any] | None:
    """The concrete schedule of one run: ``{"freeze_steps", "warmup_steps", "encoder_lr_scale", "llrd"}`` (ints
    and numbers), or ``None`` (``"none"``, or a scratch init: the field acts on pretrained weights only).

    ``auto`` (or an ``"auto"`` step count) with ``total_steps=400``: 40 frozen steps, 40 warm-up steps; with 40
    steps: 10 and 10 (never more than a quarter of the run each).
    """
    spec = normalise_ssl_schedule(value)
    if spec == "none" or init_kind != "ssl":
        return None
    spec = normalise_ssl_schedule({}) if spec == "auto" else spec
    assert isinstance(spec, dict)
    out = dict(spec)
    for key, share in (("freeze_steps", "freeze_share"), ("warmup_steps", "warmup_share")):
        if out[key] == "auto":
            out[key] = _auto_steps(int(total_steps), float(AUTO_SSL_SCHEDULE[share]))
    return out


def ssl_schedule_identity(value: Any) -> str | dict[str, Any]:
    """What enters the config hash: ``"none"``, or the full mapping (``"auto"`` = the mapping it stands for)
    plus, where a step count is ``"auto"``, the rule that resolves it (:data:`AUTO_SSL_SCHEDULE`)."""
    spec = normalise_ssl_schedule(value)
    if spec == "none":
        return spec
    spec = normalise_ssl_schedule({}) if spec == "auto" else spec
    assert isinstance(spec, dict)
    if "auto" in (spec["freeze_steps"], spec["warmup_steps"]):
        rule = {k: AUTO_SSL_SCHEDULE[k] for k in ("freeze_share", "warmup_share", "min_steps", "max_share")}
        return spec | {"auto_rule": rule}
    return spec


def check_ssl_schedule_options(
    value: Any, *, freeze_encoder: bool, encoder_warmup_steps: int, llrd: float | None
) -> None:
    """Refuse ``ssl_schedule`` combined with options that contradict it (``FinetuneConfig`` fields).

    They combine as follows: ``llrd`` (top level) applies to every init and, with a schedule, multiplies into
    ``encoder_lr_scale`` (an SSL init's encoder level ``d`` of ``n``: ``encoder_lr_scale × llrd ** (n - d)``);
    ``ssl_schedule.llrd`` does the same for SSL inits only, so setting both is refused. ``freeze_encoder`` (a
    linear probe: frozen for the whole run) and ``encoder_warmup_steps`` (the older encoder-only warm-up) are
    refused with any schedule other than ``"none"``: the schedule has its own frozen phase and warm-up.

    Raises:
        MedsslError: naming the contradicting fields and how to resolve them.
    """
    spec = normalise_ssl_schedule(value)
    if spec == "none":
        return
    if freeze_encoder:
        raise MedsslError(
            f"freeze_encoder=true (linear probe: encoder frozen for the whole run) contradicts ssl_schedule={spec!r}"
            " (frozen only for freeze_steps, then trained): set ssl_schedule: none for a linear probe, or"
            " freeze_encoder: false"
        )
    if encoder_warmup_steps:
        raise MedsslError(
            f"encoder_warmup_steps={encoder_warmup_steps} and ssl_schedule={spec!r} both warm up the encoder: set"
            " encoder_warmup_steps: 0 (ssl_schedule.freeze_steps / warmup_steps replace it) or ssl_schedule: none"
        )
    if isinstance(spec, dict) and spec["llrd"] is not None and llrd is not None:
        raise MedsslError(
            f"llrd={llrd} and ssl_schedule.llrd={spec['llrd']} are both set: keep one (llrd acts on every init,"
            " ssl_schedule.llrd on SSL inits only)"
        )
