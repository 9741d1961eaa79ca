"""A finetuning run planned and timed on this machine, without running it (``medssl finetune --dry-run``).

Users want to know, before they commit hours of a laptop or a cluster allocation, what a config will train
(the planner's patch, batch and network, the cases of the fraction) and how long it will take *here*: the same
recipe took 13.5 minutes on a 2-core AVX-512 Xeon and about 32 on a 2-core AVX2 EPYC (benchmarks/RESULTS.md,
sessions 4 and 12). :func:`estimate_run` builds the run exactly as :class:`~medssl.engines.finetune.engine.Finetuner`
does (planning, every refusal of an unfit recipe, the model, the cached datasets), then times what a run spends
its time on:

- ``time_steps`` optimizer steps after ``warmup_steps`` untimed ones, each from fetching the batch (random
  augmentation of cached volumes) to the end of the optimizer step;
- the evaluation of ``eval_cases`` validation cases (sliding window, test-time flips, metrics on the label's
  grid), giving seconds per case for every validation and the one test pass;
- with ``self_training``: every check of the teacher and pool, and the teacher labelling one pool volume (the
  whole pool is labelled once per student).

The estimate is ``setup + labelling + total_steps · step + validations · cases · per-case + test cases ·
per-case`` (seconds): an upper bound when early stopping is on. Nothing is written to ``out_dir`` and no MLflow
run is made; the timed steps change only a throw-away model.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Subset

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import epoch_loader, seed_epoch
from medssl.engines.finetune.pseudo import labelled_repeats, time_teacher
from medssl.engines.runtime.checkpoint import machine_info
from medssl.engines.runtime.estimate import TimedEstimate
from medssl.errors import MedsslError

__all__ = ["RunEstimate", "estimate_run", "validation_count", "run_counts"]


@dataclass
class RunEstimate(TimedEstimate):
    """What a finetuning run will train and how long it will take on this machine.

    Attributes:
        config: the resolved config (``"auto"`` fields planned), as the run's ``config.yaml`` would hold it.
        plan: the planner's output (segmentation with ``"auto"`` fields), else ``None``.
        cases: ``{"training", "validation", "test"}`` case counts, plus ``"pseudo"`` (pool volumes) with self-training.
        parameters: trainable parameters of the network.
        total_steps: optimizer steps of the run; ``steps_per_epoch`` with the run's epoch (self-training included).
        validations: evaluations of the validation set (the last one at the end of training).
        timing: seconds: ``setup`` (planning, model, caching), ``step`` (mean of the timed steps), ``steps_timed``,
            ``eval_case`` (per validation case), ``eval_cases_timed``, ``teacher_case`` (self-training), then the
            parts of the estimate ``labelling``, ``training``, ``validation``, ``test`` and ``total``.
        device: where it ran; ``machine``: :func:`~medssl.engines.runtime.checkpoint.machine_info`.
        notes: what the estimate leaves out or bounds.
    """

    config: dict[str, Any]
    plan: dict[str, Any] | None
    cases: dict[str, int]
    parameters: int
    total_steps: int
    steps_per_epoch: int
    validations: int


def validation_count(total_steps: int, steps_per_epoch: int, *, val_every_steps: int | None,
                     val_every: int) -> int:
    """How often a run of ``total_steps`` evaluates its validation set (:meth:`Finetuner.fit`): every
    ``val_every_steps`` optimizer steps before the last, else every ``val_every`` epochs, and once at the end
    when that step or epoch was not already a validation.

    Example: 2,400 steps, every 200 → 11 during training + 1 at the end = 12.
    """
    if val_every_steps:
        return len(range(val_every_steps, total_steps, val_every_steps)) + 1
    epochs = math.ceil(total_steps / max(1, steps_per_epoch))
    return epochs // val_every + (1 if epochs % val_every else 0)


def run_counts(config: FinetuneConfig, *, items: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """What a run of ``config`` will do, from its splits and the volumes' headers alone (no model, no data read):
    the resolved config (``"auto"`` fields planned; every refusal of an unfit recipe), its cases (``"pseudo"``:
    the self-training pool, counted from the splits: the teacher is not needed), ``steps_per_epoch``,
    ``total_steps`` and ``validations``. With an SSL init the checkpoint must exist (it fixes the preprocessing).
    ``items``: the run's cases when the caller already resolved them (``config`` is then the resolved config and
    is not planned again; ``plan`` is ``None``).

    Returns:
        ``{"config": FinetuneConfig, "plan", "cases", "steps_per_epoch", "total_steps", "validations"}``.
    """
    from medssl.data.splits import load_splits
    from medssl.engines.finetune.data import run_items, run_length
    from medssl.engines.finetune.plan import resolve_plan
    from medssl.engines.finetune.pseudo import pool_ids

    if items is None:
        items, channels = run_items(config)
        cfg, plan = resolve_plan(config, items)
        cfg = cfg.replace(in_channels=channels)
    else:
        cfg, plan = config, None
    cases = {role: len(items[role]) for role in ("training", "validation", "test")}
    per_epoch = cases["training"]
    spec = cfg.self_training
    if spec is not None:
        labelled = [it["case_id"] for it in items["training"]]
        cases["pseudo"] = len(pool_ids(load_splits(cfg.splits), cfg.seed, spec["pool"], labelled))
        per_epoch = cases["training"] * labelled_repeats(cases["training"], cases["pseudo"],
                                                         spec["labelled_share"]) + cases["pseudo"]
    steps_per_epoch, total = run_length(per_epoch, cfg.batch_size, cfg.max_steps, cfg.max_epochs)
    return {"config": cfg, "plan": plan, "cases": cases, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "validations": validation_count(total, steps_per_epoch, val_every_steps=cfg.val_every_steps,
                                            val_every=cfg.val_every)}


def _timed_steps(ft: Any, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` optimizer steps (batch fetch included) after ``warmup`` untimed ones."""
    cfg, out, epoch = ft.cfg, [], 0
    while len(out) < steps:
        seed_epoch(ft.train_ds, cfg.seed, epoch)
        ft.model.train()
        it = iter(epoch_loader(ft.train_view, cfg.batch_size, cfg.seed, epoch, cfg.num_workers))
        fetched = 0
        while len(out) < steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                if not fetched:  # an epoch without a batch would loop forever
                    raise MedsslError(f"the training cases of {cfg.out_dir} make no batch of {cfg.batch_size}")
                break
            fetched += 1
            ft.train_step(batch)
            if warmup > 0:
                warmup -= 1
            else:
                out.append(time.perf_counter() - t0)
        epoch += 1
    return out


def estimate_run(config: FinetuneConfig, *, time_steps: int = 10, warmup_steps: int = 2,
                 eval_cases: int = 2) -> RunEstimate:
    """Plan, check and time the run of ``config`` (module docstring); trains nothing that is kept.

    Args:
        config: a finetuning config (as for :func:`~medssl.engines.finetune.engine.run_finetune`).
        time_steps: optimizer steps timed (≥ 1).
        warmup_steps: steps run before timing (first-call allocations, lazy initialisation).
        eval_cases: validation cases evaluated for the per-case time (≥ 1; at most the validation set).

    Raises:
        MedsslError: every refusal of the run itself (an unfit recipe, a class absent from the fraction, a bad
            teacher or pool, an SSL checkpoint that does not fit), before any timing.
        ValueError: ``time_steps`` or ``eval_cases`` < 1.
    """
    from medssl.engines.finetune.engine import Finetuner

    if time_steps < 1 or eval_cases < 1:
        raise ValueError(f"time_steps and eval_cases must be >= 1, got {time_steps} and {eval_cases}")
    with tempfile.TemporaryDirectory(prefix="medssl_estimate_") as tmp:
        # the teacher is timed on one volume below; the Finetuner trains on the true labels only (same step cost)
        base = config.replace(out_dir=tmp, experiment=None, tracking_uri=None, self_training=None)
        t0 = time.perf_counter()
        ft = Finetuner(base, tracker=None)
        setup = time.perf_counter() - t0
        cfg = ft.cfg
        spec = config.self_training  # normalised by FinetuneConfig
        # the run's own counts (the student's epoch with self-training), on the cases the Finetuner resolved
        counts = run_counts(cfg.replace(self_training=spec), items=ft.items)
        cases, steps_per_epoch, total_steps = counts["cases"], counts["steps_per_epoch"], counts["total_steps"]
        notes = []
        teacher: dict[str, Any] | None = None
        if spec is not None:  # the teacher and pool checks, and the teacher timed on one pool volume
            teacher = time_teacher(spec, datalist=cfg.datalist, splits=cfg.splits, seed=cfg.seed, items=ft.items,
                                   out_channels=int(cfg.out_channels), device=str(ft.device))
        frozen = int((ft.ssl_plan or {}).get("freeze_steps") or 0)
        if frozen:  # time the joint phase (most of the run), not the SSL schedule's cheaper frozen one
            ft.step = frozen
            notes.append(f"steps timed after the SSL schedule's {frozen} frozen step(s); those cost less")
        step_times = _timed_steps(ft, warmup_steps, time_steps)
        k = min(eval_cases, cases["validation"])
        t0 = time.perf_counter()
        ft.evaluate(Subset(ft.val_ds, range(k)))
        eval_case = (time.perf_counter() - t0) / k
    step = float(np.mean(step_times))
    validations = counts["validations"]
    parts = {
        "labelling": teacher["s_per_case"] * teacher["pool"] if teacher else 0.0,
        "training": total_steps * step,
        "validation": validations * cases["validation"] * eval_case,
        "test": cases["test"] * eval_case,
    }
    timing = {"setup": setup, "step": step, "steps_timed": float(len(step_times)), "eval_case": eval_case,
              "eval_cases_timed": float(k)} | ({"teacher_case": teacher["s_per_case"]} if teacher else {})
    timing |= parts | {"total": setup + sum(parts.values())}
    if cfg.early_stopping_patience:
        notes.append(f"early stopping (patience {cfg.early_stopping_patience}) may end the run sooner: an upper bound")
    notes.append("test cases are read and cached at the end of training (not timed: about the validation set's "
                 "share of the setup time)")
    if cfg.device == "auto" and ft.device.type == "cpu":
        notes.append("timed on the CPU: device 'auto' found no GPU here")
    return RunEstimate(
        config=cfg.replace(out_dir=config.out_dir, experiment=config.experiment, tracking_uri=config.tracking_uri,
                           self_training=spec).to_dict(),
        plan=ft.plan, cases=cases,
        parameters=sum(p.numel() for p in ft.model.parameters() if p.requires_grad),
        total_steps=int(total_steps), steps_per_epoch=int(steps_per_epoch), validations=validations,
        timing=timing, device=str(ft.device), machine=machine_info(), notes=notes,
    )
