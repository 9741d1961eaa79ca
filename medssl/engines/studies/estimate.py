"""A whole study timed on this machine before it runs (``medssl sweep PIPELINE --dry-run``).

A label-efficiency study is one pretraining plus dozens of finetuning children (``fractions × inits × seeds``,
then the self-training students): hours to days on a CPU, and a user should know which before starting it, and
how much of a resumed study is left. :func:`estimate_sweep`:

1. prepares the study's data as the sweep does (ingest + splits once, reused when present: the study's own
   inputs, not a run's outputs) and checks every fraction and seed is in the splits;
2. times the pretraining (:func:`~medssl.engines.pretrain.estimate.estimate_pretraining`) when an ``ssl`` arm
   needs one and it has not finished;
3. counts every child from its splits and the volumes' headers (:func:`~medssl.engines.finetune.estimate.run_counts`:
   cases, steps, validations, the self-training pool) and times one child per distinct *cost shape* (network,
   patch, batch, inferer … :data:`TIME_KEYS`; every fraction and seed of a plain study shares one) with
   :func:`~medssl.engines.finetune.estimate.estimate_run`; a child's seconds are its counts times the measured
   per-step, per-case and setup seconds;
4. reads each child's ``sweep_child.json`` marker in ``<out_dir>/<study>/sweep``: finished children (and a finished
   pretraining) cost nothing more, so ``remaining`` is what a resumed sweep will still spend.

Approximations, each printed as a note: an ``ssl`` child is counted and timed as its scratch twin (the encoder
does not exist before pretraining; same network and data, and an SSL schedule's frozen steps cost less: an
upper bound), a student's teacher labels the pool at the per-case time of the teacher's own evaluation (same
network and sliding window), an interrupted child counts in full. Children run one after another here; a SLURM
submission runs them side by side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medssl.engines.runtime.checkpoint import machine_info

__all__ = ["TIME_KEYS", "ChildEstimate", "SweepEstimate", "estimate_sweep"]

#: resolved finetune fields that decide what one step, one evaluated case and the setup cost
TIME_KEYS = ("task", "network", "network_kwargs", "roi_size", "batch_size", "num_samples", "in_channels",
             "out_channels", "target_spacing", "augment", "sampling", "tta", "sw_batch_size", "sw_overlap", "amp",
             "device", "cache_rate", "num_workers", "ema_decay")


@dataclass
class ChildEstimate:
    """One child: its sweep key, arm, counts, estimated seconds and status (``FINISHED``, ``RUNNING`` … or
    ``todo`` when it never started)."""

    key: str
    fraction: float
    init: str
    seed: int
    status: str
    total_steps: int
    validations: int
    cases: dict[str, int]
    seconds: float
    shape: int  # index into SweepEstimate.shapes


@dataclass
class SweepEstimate:
    """A study's estimate: ``pretrain`` (``{"status", "seconds", "estimate"}`` or ``None`` without an ``ssl`` arm
    or with a given checkpoint), ``children``, ``shapes`` (per cost shape: its :data:`TIME_KEYS` values and the
    measured ``timing`` of its timed child), ``total_s`` (everything) and ``remaining_s`` (what is not finished)."""

    study: str
    sweep_dir: str
    pretrain: dict[str, Any] | None
    children: list[ChildEstimate]
    shapes: list[dict[str, Any]]
    total_s: float
    remaining_s: float
    machine: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return asdict(self)


def estimate_sweep(pipeline: str | Path | dict[str, Any], *, overrides: list[str] | dict[str, Any] | None = None,
                   time_steps: int = 10) -> SweepEstimate:
    """Count and time the study of ``pipeline`` (module docstring); trains nothing that is kept, starts no MLflow run.

    Raises:
        MedsslError: what the sweep refuses before running (bad pipeline or data, a fraction or seed missing from
            the splits, an unfit recipe for some child).
    """
    from medssl.config import PretrainConfig
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.estimate import estimate_run, run_counts
    from medssl.engines.pretrain.estimate import estimate_pretraining
    from medssl.engines.studies.pipeline import finetune_dict, open_study, teacher_init
    from medssl.engines.studies.results import _child_key, read_marker

    pl, datalist, splits = open_study(pipeline, overrides)
    sweep_dir = pl.study_root / "sweep"
    paths = {"datalist": str(datalist), "splits": str(splits)}
    notes = [f"children run one after another ({len(pl.children())} of them); `--slurm` runs them side by side"]
    pretrain = None
    spec = dict(pl.pretrain or {})
    if "ssl" in pl.inits and not spec.get("checkpoint"):
        status = read_marker(sweep_dir / "pretrain").get("status") or "todo"
        pcfg = PretrainConfig.from_dict({**paths, **spec, "out_dir": str(sweep_dir / "pretrain"), "experiment": None})
        est = estimate_pretraining(pcfg, time_steps=max(1, time_steps // 2))
        pretrain = {"status": status, "seconds": est.timing["total"], "estimate": est.to_dict()}
    if "ssl" in pl.inits:
        notes.append("ssl children are counted and timed as their scratch twins (no encoder before pretraining; "
                      "an SSL schedule's frozen steps cost less): an upper bound")
    shapes: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    children: list[ChildEstimate] = []
    for fraction, arm, seed in pl.children():
        key = _child_key(fraction, arm, seed)
        cfg = {**finetune_dict(pl, fraction, arm), **paths, "fraction": fraction, "seed": seed, "init": "scratch",
               "out_dir": str(sweep_dir / key), "experiment": None}
        teacher = teacher_init(arm)
        if teacher is not None:  # the teacher's checkpoint need not exist: counting reads only the splits
            best = sweep_dir / _child_key(fraction, teacher, seed) / "checkpoints" / "best.pt"
            cfg["self_training"] = {**pl.student_options(), "teacher": str(best)}
        counts = run_counts(FinetuneConfig.from_dict(cfg))
        resolved = counts["config"].to_dict()
        shape_key = json.dumps({k: resolved.get(k) for k in TIME_KEYS}, sort_keys=True, default=str)
        if shape_key not in index:
            timed = counts["config"].replace(self_training=None, init="scratch")
            index[shape_key] = len(shapes)
            run = estimate_run(timed, time_steps=time_steps)
            shapes.append({"fields": json.loads(shape_key), "timed_child": key, "timing": run.timing})
        t = shapes[index[shape_key]]["timing"]
        cases = counts["cases"]
        seconds = (t["setup"] + cases.get("pseudo", 0) * t["eval_case"] + counts["total_steps"] * t["step"]
                   + counts["validations"] * cases["validation"] * t["eval_case"] + cases["test"] * t["eval_case"])
        status = read_marker(sweep_dir / key).get("status") or "todo"
        children.append(ChildEstimate(key, fraction, arm, seed, status,
                                      counts["total_steps"], counts["validations"], cases, seconds, index[shape_key]))
    if any("pseudo" in c.cases for c in children):
        notes.append("a student's teacher labels its pool at the teacher's own per-case evaluation time")
    total = sum(c.seconds for c in children) + (pretrain["seconds"] if pretrain else 0.0)
    remaining = sum(c.seconds for c in children if c.status != "FINISHED")
    if pretrain and pretrain["status"] != "FINISHED":
        remaining += pretrain["seconds"]
    if any(c.status not in ("FINISHED", "todo") for c in children):
        notes.append("a started but unfinished child is counted in full (it resumes from its last epoch)")
    return SweepEstimate(pl.study, str(sweep_dir), pretrain, children, shapes, total, remaining, machine_info(), notes)
