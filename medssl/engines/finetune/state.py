"""Checkpoint files of a finetuning run: :class:`FinetuneCheckpointer`, held by the
:class:`~medssl.engines.finetune.engine.Finetuner`.

``checkpoints/best.pt`` (``{"format", "recipe", "config", "epoch", "model", "val"}``, written on every improvement
of the validation metric; :func:`~medssl.engines.finetune.build.rebuild_model` rebuilds its network) and
``checkpoints/last.pt`` (one dict of every state, written at epoch ends) from which a run resumes exactly. What the
run already logged to MLflow (a resume redoes the steps since ``last.pt`` and must not log them twice) is
``checkpoints/mlflow.json``, :mod:`medssl.engines.finetune.ledger`.
The checkpointer is given the stateful objects once (like Ignite's ``Checkpoint(to_save=...)``); the run's
counters (epoch, step, history) are passed at each save and returned by :meth:`FinetuneCheckpointer.load`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.ema import WeightEMA
from medssl.engines.finetune.evaluation import Selection
from medssl.engines.runtime import checkpoint as ck

__all__ = ["RESUME_FIELDS", "FinetuneCheckpointer"]

log = logging.getLogger(__name__)

#: config fields a resumed run must share with its checkpoint: what the model is, which cases it sees and how
#: they are preprocessed, sampled and augmented (``max_steps`` / ``lr`` may change: the schedule is rebuilt)
RESUME_FIELDS = ("task", "network", "network_kwargs", "init", "fraction", "seed", "roi_size", "in_channels",
                 "out_channels", "target_spacing", "normalisation", "batch_size", "num_samples", "sampling",
                 "augment", "ssl_schedule", "ema_decay", "self_training")
#: fields checked only when the checkpoint's config holds them (added after the first checkpoints were written)
#: (``ema_decay`` and ``self_training`` are not: a checkpoint without them reads as ``None``, so turning EMA or
#: self-training on or off is refused)
_LATER_FIELDS = frozenset({"sampling", "augment", "ssl_schedule", "in_channels"})


class FinetuneCheckpointer:
    """Writes ``best.pt`` / ``last.pt`` under ``out_dir/checkpoints`` and restores a run from ``last.pt``.

    Args:
        out_dir: the run folder.
        config: the resolved run config (stored in both files; a resume is checked against it).
        recipe: the model recipe (``build``, ``augment``, ``plan`` …; what ``rebuild_model`` needs).
        model: the network.
        optimizer: its optimizer.
        schedule: the lr schedule (``state_dict`` / ``load_state_dict`` / ``total_steps``).
        scaler: the AMP ``GradScaler``.
        selection: the best-on-validation record.
        transfer: the SSL transfer report (``None`` from scratch).
        run_id: the MLflow run id (``None`` without tracking).
        ema: the weight average (:class:`~medssl.engines.finetune.ema.WeightEMA`) when ``ema_decay`` is set:
            ``best.pt`` then holds the averaged weights (the ones validated), ``last.pt`` both.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: FinetuneConfig,
        recipe: dict[str, Any],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        scaler: torch.amp.GradScaler,
        selection: Selection,
        transfer: dict[str, Any] | None = None,
        run_id: str | None = None,
        ema: WeightEMA | None = None,
    ) -> None:
        self.folder = Path(out_dir) / "checkpoints"
        self.config, self.recipe, self.model, self.optimizer = config, recipe, model, optimizer
        self.schedule, self.scaler, self.selection = schedule, scaler, selection
        self.transfer, self.run_id, self.ema = transfer, run_id, ema

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    def save_best(self, epoch: int, values: dict[str, float], network: torch.nn.Module) -> Path:
        """Write ``best.pt``: the weights of ``network``, the one that was validated (the EMA average with
        ``ema_decay``: :attr:`Finetuner.eval_model`), with the validation ``values`` of ``epoch``."""
        state = {
            "format": 1,
            "recipe": self.recipe,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "model": network.state_dict(),
            "val": values,
        }
        return ck.atomic_save(state, self.best_path)

    def state_dict(self, *, epoch: int, step: int, history: list[dict[str, float]]) -> dict[str, Any]:
        """The ``last.pt`` dict: every state of the run (model, optimizer, schedule, scaler, RNG, selection)."""
        return {
            "format": 1,
            "kind": "finetune",
            "recipe": self.recipe,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ck.capture_rng(),
            **self.selection.state_dict(),
            "history": history,
            "transfer": self.transfer,
            "mlflow_run_id": self.run_id,
        } | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def save_last(self, *, epoch: int, step: int, history: list[dict[str, float]]) -> Path:
        """Write ``last.pt`` (atomically) with :meth:`state_dict`."""
        return ck.atomic_save(self.state_dict(epoch=epoch, step=step, history=history), self.last_path)

    def load(self, state: dict[str, Any], *, total_steps: int) -> tuple[int, int, list[dict[str, float]]]:
        """Restore every state of a ``last.pt`` dict (RNG last); returns its ``(epoch, step, history)``.

        Args:
            state: the loaded ``last.pt`` dict.
            total_steps: this run's step budget (the schedule's horizon; ``max_steps`` may change on resume).

        Raises:
            ConfigMismatchError: the checkpoint is of another task/network/init/fraction/seed/roi (both named).
        """
        saved = state["config"]
        fields = tuple(f for f in RESUME_FIELDS if f not in _LATER_FIELDS or f in saved)
        ck.check_recipe(saved, self.config.to_dict(), fields, what="finetune checkpoint vs config")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # the config check above guarantees a checkpoint of an EMA run
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.schedule.total_steps = total_steps
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.selection.load_state_dict(state)
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state.get("history") or [])
        ck.restore_rng(state["rng"])
        log.info("resumed at epoch %d (step %d)", epoch, step)
        return epoch, step, history
