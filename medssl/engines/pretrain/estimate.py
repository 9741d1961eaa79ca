"""A pretraining run timed on this machine without running it (``medssl pretrain --dry-run``).

Pretraining is the long part of a study, and a user should know before starting whether ``total_steps`` fits an
afternoon on a laptop or needs a cluster allocation. :func:`estimate_pretraining` builds the run as
:func:`~medssl.engines.pretrain.engine.run_pretraining` does (pool, components, the cached dataset; every refusal
of bad data or config), then times:

- ``time_steps`` optimizer steps after ``warmup_steps`` untimed ones (crop batching, augmentation of both views,
  forward, backward, optimizer; gradient accumulation included);
- one probe of the representation monitor when ``monitor_every`` is on (it probes at step 0 and every
  ``monitor_every`` steps);
- one checkpoint write (every ``checkpoint_every`` steps and at the last one).

Estimate (seconds): ``setup + total_steps · step + probes · probe + checkpoints · checkpoint``. One process: under
``torchrun`` each rank runs ``total_steps`` steps of its own ``batch_size`` (the estimate is a rank's, before
the gradient all-reduce). Nothing is written to ``out_dir`` and no MLflow run is made.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medssl.config import PretrainConfig
from medssl.engines.runtime import checkpoint as ck
from medssl.engines.runtime.estimate import TimedEstimate

__all__ = ["PretrainEstimate", "estimate_pretraining", "checkpoint_count"]


@dataclass
class PretrainEstimate(TimedEstimate):
    """What a pretraining run will do and how long it will take on this machine.

    Attributes:
        config: the run's config (``in_channels`` resolved from the pool).
        pool: volumes in the pretraining pool; ``parameters``: trainable parameters of the method (encoder + heads).
        total_steps: optimizer steps; ``epoch_length``: steps per pass over the pool.
        probes: representation-monitor probes (0 when off); ``checkpoints``: checkpoint writes (the last step's
            included).
        timing: seconds: ``setup``, ``step`` (mean of the timed steps), ``steps_timed``, ``probe``, ``checkpoint``,
            then the parts ``training``, ``monitor``, ``checkpointing`` and ``total``.
        device: where it ran; ``machine``: :func:`~medssl.engines.runtime.checkpoint.machine_info`.
        notes: what the estimate leaves out.
    """

    config: dict[str, Any]
    pool: int
    parameters: int
    total_steps: int
    epoch_length: int
    probes: int
    checkpoints: int


def checkpoint_count(total_steps: int, every: int) -> int:
    """Checkpoint writes of a run (:class:`~medssl.engines.pretrain.handlers.CheckpointSaver`): every ``every``
    steps and at the last step (``every`` = 0: only the last). Example: 7 steps, every 3 → steps 3, 6, 7 = 3."""
    if not every:
        return 1
    return total_steps // every + (1 if total_steps % every else 0)


def estimate_pretraining(config: PretrainConfig, *, time_steps: int = 5, warmup_steps: int = 1) -> PretrainEstimate:
    """Build, check and time the pretraining run of ``config`` (module docstring); keeps nothing it trained.

    Raises:
        MedsslError: what the run refuses (an unusable pool, a method/encoder that does not fit the views).
        ValueError: ``time_steps`` < 1.
    """
    from medssl.engines.pretrain.components import build_components
    from medssl.engines.pretrain.engine import Pretrainer
    from medssl.engines.pretrain.monitor import build_monitor
    from medssl.engines.pretrain.pool import load_pool, resolve_in_channels

    if time_steps < 1:
        raise ValueError(f"time_steps must be >= 1, got {time_steps}")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medssl_estimate_") as tmp:
        t0 = time.perf_counter()
        cfg = config.replace(out_dir=tmp, experiment=None)
        pool = load_pool(cfg.datalist, cfg.sections, cfg.splits, cfg.split_seed)
        cfg = resolve_in_channels(cfg, pool)
        ck.seed_all(cfg.seed)
        encoder, method, augment = build_components(cfg)
        trainer = Pretrainer(cfg, encoder, method, augment, pool, handlers=[])
        setup = time.perf_counter() - t0
        times = []
        for i in range(warmup_steps + time_steps):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= warmup_steps:
                times.append(time.perf_counter() - t0)
        probe = 0.0
        if cfg.monitor_every:
            monitor = build_monitor(cfg, pool, trainer.device)
            if monitor is None:
                notes.append("monitor_every is set but the pool has no labelled case: no probes")
            else:
                probe = float(monitor.evaluate(trainer.encoder)["monitor/seconds"])
        t0 = time.perf_counter()
        trainer.checkpointer.save(trainer.step, None)
        save = time.perf_counter() - t0
        total_steps, epoch_length = trainer.total_steps, trainer.state.epoch_length
        parameters = sum(p.numel() for p in trainer.method.parameters() if p.requires_grad)
        device = str(trainer.device)
    step = float(np.mean(times))
    probes = (1 + total_steps // cfg.monitor_every) if probe else 0  # step 0 and every monitor_every
    checkpoints = checkpoint_count(total_steps, cfg.checkpoint_every)
    parts = {"training": total_steps * step, "monitor": probes * probe, "checkpointing": checkpoints * save}
    timing = {"setup": setup, "step": step, "steps_timed": float(len(times)), "probe": probe, "checkpoint": save}
    timing |= parts | {"total": setup + sum(parts.values())}
    if cfg.preview:
        notes.append("the augmentation preview PNG (once, at the start) is not timed")
    notes.append("the final encoder export and MLflow logging are not timed (seconds)")
    return PretrainEstimate(
        config=cfg.replace(out_dir=config.out_dir, experiment=config.experiment).to_dict(), pool=len(pool),
        parameters=parameters, total_steps=int(total_steps), epoch_length=int(epoch_length), probes=probes,
        checkpoints=checkpoints, timing=timing, device=device, machine=ck.machine_info(), notes=notes,
    )
