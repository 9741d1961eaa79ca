"""Evaluation, model selection and checkpoints of :class:`medssl.engines.finetune.Finetuner`.

`_FinetunerState` is a mixin of ``Finetuner`` (it uses the attributes set by ``Finetuner.__init__``:
``cfg``, ``model``, ``val_ds``, ``inferer``, ``device``, ``optimizer``, ``schedule``, ``scaler``, ``best``…):
metrics on a dataset, validation with ``best.pt`` on improvement and early stopping, and the ``last.pt``
state dict.
The training step and loop stay in :mod:`medssl.engines.finetune`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from medssl.engines import checkpoint as ck
from medssl.engines.finetune_native import evaluate_native
from medssl.engines.metrics import SELECTION_METRIC, evaluate_model

__all__ = ["RESUME_FIELDS"]

log = logging.getLogger(__name__)

#: config fields a resumed run must share with its checkpoint: what the model is, which cases it sees and how
#: they are preprocessed, sampled and augmented (``max_steps`` / ``lr`` may change: the schedule is rebuilt)
RESUME_FIELDS = ("task", "network", "network_kwargs", "init", "fraction", "seed", "roi_size", "in_channels",
                 "out_channels", "target_spacing", "normalisation", "batch_size", "num_samples", "sampling",
                 "augment", "ssl_schedule")
#: fields checked only when the checkpoint's config holds them (added after the first checkpoints were written)
_LATER_FIELDS = frozenset({"sampling", "augment", "ssl_schedule", "in_channels"})


class _FinetunerState:
    """Evaluation / selection / checkpoint methods of ``Finetuner`` (a mixin; see the module docstring)."""

    # -- evaluation and selection ---------------------------------------------------------------------
    def evaluate(self, dataset: Any) -> dict[str, float]:
        """Metrics of the current model on ``dataset`` (sliding window for segmentation), unprefixed; with
        ``target_spacing``, segmentation is scored in the label's native grid (:mod:`.finetune_native`)."""
        if self.cfg.task == "segmentation" and self.cfg.target_spacing is not None:
            return evaluate_native(
                self.model,
                dataset,
                num_classes=self.cfg.out_channels,
                inferer=self.inferer,
                device=self.device,
                amp_dtype=self.amp_dtype,
                num_workers=self.cfg.num_workers,
            )
        return evaluate_model(
            self.model,
            dataset,
            task=self.cfg.task,
            num_classes=self.cfg.out_channels,
            inferer=self.inferer,
            device=self.device,
            amp_dtype=self.amp_dtype,
            batch_size=4 * self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
        )

    def validate(self) -> dict[str, float]:
        """Evaluate on validation; keep ``best.pt`` on improvement of the selection metric; early stopping."""
        vals = self.evaluate(self.val_ds)
        name = SELECTION_METRIC[self.cfg.task]
        value = vals[name]
        best = self.best["metric"] if self.best else None
        if self.best is None or (
            math.isfinite(value) and (best is None or not math.isfinite(best) or value > best)
        ):
            self.best = {"metric": value, "epoch": self.epoch, "values": vals}
            self.bad_validations = 0
            self._save_best(vals)
        else:
            self.bad_validations += 1
            patience = self.cfg.early_stopping_patience
            if patience and self.bad_validations >= patience:
                log.info(
                    "early stopping at epoch %d: val %s did not improve for %d validations (best %.4f at %d)",
                    self.epoch,
                    name,
                    patience,
                    self.best["metric"],
                    self.best["epoch"],
                )
                self.stopped = True
        return vals

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save_best(self, vals: dict[str, float]) -> Path:
        state = {
            "format": 1,
            "recipe": self.recipe,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "val": vals,
        }
        return ck.atomic_save(state, self.out / "checkpoints" / "best.pt")

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "kind": "finetune",
            "recipe": self.recipe,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ck.capture_rng(),
            "best": self.best,
            "bad_validations": self.bad_validations,
            "stopped": self.stopped,
            "history": self.history,
            "transfer": self.transfer,
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every state of a ``last.pt`` dict (RNG last).

        Raises:
            ConfigMismatchError: the checkpoint is of another task/network/init/fraction/seed/roi.
        """
        saved = state["config"]
        fields = tuple(f for f in RESUME_FIELDS if f not in _LATER_FIELDS or f in saved)
        ck.check_recipe(saved, self.cfg.to_dict(), fields, what="finetune checkpoint vs config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.schedule.total_steps = self.total_steps
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.bad_validations = state.get("best"), int(state.get("bad_validations", 0))
        self.stopped, self.history = bool(state.get("stopped")), list(state.get("history") or [])
        ck.restore_rng(state["rng"])
        log.info("resumed at epoch %d (step %d)", self.epoch, self.step)
