"""Evaluation and model selection of a finetuning run, as two objects the
:class:`~medssl.engines.finetune.engine.Finetuner` holds:

- :class:`FinetuneEvaluator`: the metrics of a model on a dataset (sliding window for segmentation, scored in the
  label's native grid when the run resamples; batched logits for classification), the numbers logged as
  ``val_*`` / ``test_*``;
- :class:`Selection`: the best-on-validation record (``SELECTION_METRIC`` of the task) and early stopping.

Both are built from plain arguments; the checkpoint files are :mod:`medssl.engines.finetune.state`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from medssl.engines.finetune.metrics import SELECTION_METRIC, evaluate_model
from medssl.engines.finetune.native import evaluate_native

__all__ = ["FinetuneEvaluator", "Selection"]

log = logging.getLogger(__name__)


class FinetuneEvaluator:
    """Metrics of a model on a dataset, unprefixed (``dice_mean``, ``hd95_mean`` …; ``auc``, ``accuracy`` …).

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        num_classes: output channels of the network (background included for segmentation).
        inferer: ``inferer(x, network) -> logits`` (a MONAI ``SlidingWindowInferer``, possibly wrapped in
            :class:`~medssl.engines.finetune.tta.FlipTTAInferer`).
        device: where the model runs.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or ``None``.
        batch_size: classification evaluation batch size (segmentation runs one case at a time).
        num_workers: DataLoader workers.
        native_grid: score segmentation in each label's own grid (:mod:`medssl.engines.finetune.native`): the
            run resamples to a ``target_spacing``.
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        inferer: Any,
        device: torch.device | str = "cpu",
        *,
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        native_grid: bool = False,
    ) -> None:
        self.task, self.num_classes, self.inferer = task, int(num_classes), inferer
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.native_grid = bool(native_grid) and task == "segmentation"

    def evaluate(self, model: torch.nn.Module, dataset: Any) -> dict[str, float]:
        """Metrics of ``model`` on ``dataset`` (items ``image (C, D, H, W)``, ``label``)."""
        if self.native_grid:
            return evaluate_native(
                model,
                dataset,
                num_classes=self.num_classes,
                inferer=self.inferer,
                device=self.device,
                amp_dtype=self.amp_dtype,
                num_workers=self.num_workers,
            )
        return evaluate_model(
            model,
            dataset,
            task=self.task,
            num_classes=self.num_classes,
            inferer=self.inferer,
            device=self.device,
            amp_dtype=self.amp_dtype,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )


class Selection:
    """Best-on-validation selection and early stopping on the task's selection metric (higher is better; a
    non-finite value never beats a finite best, but the first validation is always the best so far).

    Args:
        task: ``"segmentation"`` (``dice_mean``) or ``"classification"`` (``auc``).
        patience: stop after this many validations without improvement (``0``/``None``: never).

    Attributes:
        best: ``{"metric", "epoch", "values"}`` of the best validation, or ``None`` before the first.
        bad_validations: validations since the last improvement.
        stopped: early stopping triggered.
    """

    def __init__(self, task: str, patience: int | None = 0) -> None:
        self.metric, self.patience = SELECTION_METRIC[task], int(patience or 0)
        self.best: dict[str, Any] | None = None
        self.bad_validations, self.stopped = 0, False

    def update(self, values: dict[str, float], epoch: int) -> bool:
        """Record the validation ``values`` of ``epoch``; returns whether they are the new best."""
        value, best = values[self.metric], self.best["metric"] if self.best else None
        if self.best is None or (math.isfinite(value) and (best is None or not math.isfinite(best) or value > best)):
            self.best = {"metric": value, "epoch": epoch, "values": values}
            self.bad_validations = 0
            return True
        self.bad_validations += 1
        if self.patience and self.bad_validations >= self.patience:
            log.info(
                "early stopping at epoch %d: val %s did not improve for %d validations (best %.4f at %d)",
                epoch,
                self.metric,
                self.patience,
                self.best["metric"],
                self.best["epoch"],
            )
            self.stopped = True
        return False

    def state_dict(self) -> dict[str, Any]:
        """``{"best", "bad_validations", "stopped"}`` (top-level keys of the finetune ``last.pt``)."""
        return {"best": self.best, "bad_validations": self.bad_validations, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a ``last.pt`` dict (missing keys: nothing selected yet)."""
        self.best, self.bad_validations = state.get("best"), int(state.get("bad_validations", 0))
        self.stopped = bool(state.get("stopped"))
