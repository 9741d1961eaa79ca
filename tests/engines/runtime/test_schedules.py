from __future__ import annotations

import math

import pytest
import torch

from medssl.engines.runtime.schedules import WarmupCosineSchedule, warmup_cosine


def test_warmup_then_cosine_known_values() -> None:
    vals = [warmup_cosine(s, base=1.0, final=0.0, total_steps=10, warmup_steps=2) for s in range(11)]
    assert vals[0] == pytest.approx(0.5) and vals[1] == pytest.approx(1.0)  # linear warm-up
    assert vals[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert vals[6] == pytest.approx(0.5)  # half-way through the 8 cosine steps
    assert vals[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert vals[10] == pytest.approx(0.0) and warmup_cosine(50, 1.0, 0.0, 10, 2) == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:], strict=False))  # monotone decay


def test_no_warmup_and_final_value() -> None:
    assert warmup_cosine(0, base=3e-4, final=1e-6, total_steps=100) == pytest.approx(3e-4)
    assert warmup_cosine(100, base=3e-4, final=1e-6, total_steps=100) == pytest.approx(1e-6)
    with pytest.raises(ValueError):
        warmup_cosine(-1, 1.0, 0.0, 10)


def test_schedule_sets_lr_and_round_trips() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [], "lr_scale": 0.5}], lr=1.0)
    sched = WarmupCosineSchedule(opt, base_lr=2.0, min_lr=0.0, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(sched.apply())
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0) and opt.param_groups[1]["lr"] == pytest.approx(1.0)
    other = WarmupCosineSchedule(opt, base_lr=9.0, min_lr=0.0, total_steps=3)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 5 and other.apply() == pytest.approx(sched.apply())
    with pytest.raises(ValueError):
        WarmupCosineSchedule(opt, 1.0, 0.0, total_steps=0)
