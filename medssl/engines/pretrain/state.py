"""Checkpoints and exact resume of a pretraining run: :class:`PretrainCheckpointer`, held by the
:class:`~medssl.engines.pretrain.engine.Pretrainer`.

One dict holds every state (config, recipe, step, method, optimizer, schedule, scaler, augmentation, RNG, data
position, MLflow run id; under DDP every rank's RNG / augmentation / data state in ``"ranks"``), written
atomically by rank 0 as ``checkpoints/step_XXXXXXX.pt`` and ``checkpoints/last.pt``. The checkpointer is given
the stateful objects once (like Ignite's ``Checkpoint(to_save=...)``); the step and run id are passed at each
save. A resume must continue on the same pool (:func:`check_same_pool`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from medssl.engines.pretrain.data import CropBatcher
from medssl.engines.runtime import checkpoint as ck
from medssl.engines.runtime import distributed as dd
from medssl.errors import MedsslError

__all__ = ["PretrainCheckpointer", "check_same_pool", "truncate_metrics_log"]

log = logging.getLogger(__name__)


class PretrainCheckpointer:
    """Writes, prunes and restores the checkpoints of one pretraining run.

    Args:
        out_dir: the run folder (files go to ``out_dir/checkpoints``).
        config: the resolved :class:`~medssl.config.PretrainConfig` (stored; a resume logs changed fields).
        recipe: the encoder recipe (:func:`~medssl.engines.pretrain.components.make_recipe` + ``pool``); a resume
            must match it (:func:`~medssl.engines.runtime.checkpoint.check_recipe`) and its pool.
        method: the SSL method (plain module, not the DDP wrapper).
        optimizer: its optimizer.
        schedule: the lr schedule (``state_dict`` / ``load_state_dict`` / ``total_steps``).
        scaler: the AMP ``GradScaler``.
        augment: the batched augmentation (its random state, via ``component_state``).
        batcher: the :class:`~medssl.engines.pretrain.data.CropBatcher` (data position).
        dist: this process's :class:`~medssl.engines.runtime.distributed.DistInfo`.
        keep: periodic ``step_*.pt`` files kept (at least 1).

    Attributes:
        written: the ``step_*.pt`` paths written by this run and still kept (oldest first).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: Any,
        recipe: dict[str, Any],
        method: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        scaler: torch.amp.GradScaler,
        augment: Any,
        batcher: CropBatcher,
        dist: dd.DistInfo,
        keep: int = 1,
    ) -> None:
        self.folder = Path(out_dir) / "checkpoints"
        self.config, self.recipe, self.method, self.optimizer = config, recipe, method, optimizer
        self.schedule, self.scaler, self.augment, self.batcher = schedule, scaler, augment, batcher
        self.dist, self.keep = dist, max(1, int(keep))
        self.written: list[Path] = []

    def last_path(self) -> Path | None:
        """``checkpoints/last.pt`` if it exists."""
        p = self.folder / "last.pt"
        return p if p.exists() else None

    def is_written(self, step: int) -> bool:
        """Whether the last checkpoint written by this run is the one of ``step``."""
        return bool(self.written) and self.written[-1].name == f"step_{step:07d}.pt"

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": ck.capture_rng(), "augment": ck.component_state(self.augment), "data": self.batcher.state_dict()}

    def state_dict(self, step: int, run_id: str | None = None) -> dict[str, Any]:
        """The checkpoint dict; the top-level RNG/augment/data are rank 0's, ``"ranks"`` (DDP only) holds every
        rank's. Under DDP every rank must call it (one all-gather)."""
        ranks = dd.all_gather_objects(self._rank_state()) if self.dist.enabled else None
        return {
            "format": 1,
            "recipe": self.recipe,
            "config": self.config.to_dict(),
            "step": step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "augment": ck.component_state(self.augment),
            "rng": ck.capture_rng(),
            "data": self.batcher.state_dict(),
            "mlflow_run_id": run_id,
            **({"ranks": ranks, "world_size": self.dist.world_size} if ranks else {}),
        }

    def save(self, step: int, run_id: str | None = None) -> Path:
        """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically (rank 0); prune old periodic ones.
        Under DDP every rank calls it and leaves once the files exist."""
        state, path = self.state_dict(step, run_id), self.folder / f"step_{step:07d}.pt"
        if self.dist.is_main:
            ck.atomic_save(state, path)
            ck.atomic_save(state, self.folder / "last.pt")
        self.written.append(path)
        while len(self.written) > self.keep:
            old = self.written.pop(0)
            if self.dist.is_main:
                old.unlink(missing_ok=True)
        dd.barrier()
        if self.dist.is_main:
            log.info("checkpoint %s", path)
        return path

    def resume(self, path: str | Path, *, total_steps: int) -> dict[str, Any]:
        """Restore method, optimizer, schedule (horizon ``total_steps``), scaler, augmentation, RNG and data
        position from ``path``; returns the checkpoint dict (its ``"step"`` is where the run continues).

        Raises:
            ConfigMismatchError: the checkpoint is of another method/encoder/input size (both named).
            MedsslError: it was pretrained on another pool.
        """
        state = ck.load_checkpoint(path, map_location="cpu")  # RNG states must stay on the CPU
        ck.check_recipe(state["recipe"], self.recipe)
        check_same_pool(state["recipe"].get("pool"), self.recipe["pool"], path)
        current = self.config.to_dict()
        changed = {k: (v, current.get(k)) for k, v in state.get("config", {}).items() if current.get(k) != v}
        if changed:
            log.info("resuming with changed config fields: %s", changed)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.schedule.total_steps = total_steps
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        own = dd.select_rank_state(state, self.dist)
        if own is not None:
            ck.load_component_state(self.augment, own.get("augment"))
            self.batcher.load_state_dict(own["data"])
            ck.restore_rng(own["rng"])
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return state


def _step_of(line: str) -> int | None:
    """A ``metrics.jsonl`` line's step; ``None`` for a line cut short by a kill while it was written."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def truncate_metrics_log(path: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` lines of steps after ``step`` (written before a crash, redone on resume) and a
    torn line (a kill in the middle of a write)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        kept = [x for x in lines if (s := _step_of(x)) is not None and s <= step]
        if len(kept) < len(lines):
            log.info("%s: %d line(s) after step %d (or torn) dropped: the resume redoes them", path,
                     len(lines) - len(kept), step)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)


def check_same_pool(saved: dict[str, Any] | None, current: dict[str, Any], path: str | Path) -> None:
    """A resume must continue on the pool the checkpoint was trained on: the recipe's case ids would
    otherwise understate what the encoder saw (and the data position would not be exact).

    Raises:
        MedsslError: the pools differ, naming how many cases were added / removed.
    """
    if saved is None:
        log.warning("%s records no pretraining pool (older checkpoint): the recipe will list today's pool", path)
        return
    old, new = set(saved.get("case_ids", [])), set(current["case_ids"])
    if old != new:
        raise MedsslError(
            f"{path} was pretrained on another pool ({len(new - old)} cases added, {len(old - new)} removed "
            "since, e.g. seeds added to splits.json): resuming would hide what the encoder saw; start a new run"
        )
