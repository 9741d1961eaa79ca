"""nnU-Net v2 trainer with a fixed iteration budget, for ``benchmarks/peer_nnunet.py`` (issue 12, item 2).

``nnUNetTrainerMedsslBudget`` is the stock ``nnUNetTrainer`` (its augmentation, deep supervision, SGD with
Nesterov, poly learning-rate schedule, plans) with only the training length changed:

- total iterations from ``$MEDSSL_NNUNET_ITERATIONS`` (``N``); :func:`budget_schedule` splits them into
  ``E`` epochs of ``I`` iterations (``I`` close to ``$MEDSSL_NNUNET_EPOCH_ITERS``, default 50), so the
  per-epoch poly schedule ``lr = 0.01 · (1 − e/E)^0.9`` ends exactly at the last iteration trained, ``E · I``
  (≤ ``N``, short by ``N mod E`` < ``E`` iterations);
- the per-epoch pseudo-Dice validation cut to 1 batch (stock: 50), since it only feeds the progress plot and
  ``checkpoint_best`` (``checkpoint_final`` is what is evaluated);
- the final validation (``perform_actual_validation``) skipped: with fold ``all`` it predicts the training
  cases, which costs minutes and measures nothing the peer comparison reports (medssl scores the test set);
- the end time of every training step (``time.perf_counter``, s) written to ``$MEDSSL_NNUNET_TIMING`` (JSON)
  at the end of every epoch, so the budget probe and the report can read seconds per iteration.

nnU-Net finds trainers by class name inside its package (``nnunetv2/training/nnUNetTrainer``, the documented
place for custom trainers); ``peer_nnunet.py`` copies this file there as a top-level module (searched before
the ``primus`` subpackage, whose timm → torchvision import fails with the CPU-only torch of ``.venv-nnunet``).
Without nnunetv2 installed only :func:`budget_schedule` is defined (medssl's tests import it).
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["budget_schedule", "ENV_ITERATIONS", "ENV_EPOCH_ITERS", "ENV_TIMING", "TRAINER_NAME"]

ENV_ITERATIONS = "MEDSSL_NNUNET_ITERATIONS"
ENV_EPOCH_ITERS = "MEDSSL_NNUNET_EPOCH_ITERS"
ENV_TIMING = "MEDSSL_NNUNET_TIMING"
TRAINER_NAME = "nnUNetTrainerMedsslBudget"


def budget_schedule(total: int, epoch_iters: int = 50) -> tuple[int, int]:
    """Epochs and iterations per epoch for a budget of ``total`` training iterations.

    Args:
        total: iteration budget ``N`` (≥ 1).
        epoch_iters: wanted iterations per epoch (nnU-Net's stock epoch is 250; shorter epochs give the
            per-epoch poly schedule more steps within a small budget).

    Returns:
        ``(E, I)`` with ``E = max(1, round(N / epoch_iters))`` and ``I = N // E``: ``E · I ≤ N`` iterations
        are trained and the poly schedule ends at the last. Example: ``N = 1125`` → ``(22, 51)``, 1,122
        iterations; ``N = 250`` → ``(5, 50)``; ``N = 13`` → ``(1, 13)``.

    Raises:
        ValueError: ``total < 1`` or ``epoch_iters < 1``.
    """
    if total < 1 or epoch_iters < 1:
        raise ValueError(f"iterations and iterations per epoch must be >= 1, got {total} and {epoch_iters}")
    epochs = max(1, round(total / epoch_iters))
    return epochs, total // epochs


#: torch threads of the trainer (optional; default: nnU-Net's choice, all cores on CPU)
ENV_THREADS = "MEDSSL_NNUNET_THREADS"

try:  # the trainer class exists only inside .venv-nnunet
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError:  # medssl's own venv: only the arithmetic above is importable
    nnUNetTrainer = None

if nnUNetTrainer is not None:

    class nnUNetTrainerMedsslBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's trainer naming
        """Stock nnU-Net trainer, training length from ``$MEDSSL_NNUNET_ITERATIONS`` (module docstring)."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:  # noqa: B008 - nnU-Net's signature
            super().__init__(plans, configuration, fold, dataset_json, device)
            if os.environ.get(ENV_THREADS):  # nnUNetv2_train -device cpu sets torch threads = all cores; on a
                torch.set_num_threads(int(os.environ[ENV_THREADS]))  # shared machine 1 thread is 3-8x faster
            if ENV_ITERATIONS not in os.environ:
                raise RuntimeError(f"{TRAINER_NAME} needs ${ENV_ITERATIONS} (total training iterations)")
            total = int(os.environ[ENV_ITERATIONS])
            self.num_epochs, self.num_iterations_per_epoch = budget_schedule(
                total, int(os.environ.get(ENV_EPOCH_ITERS, "50")))
            self.num_val_iterations_per_epoch = 1
            self.medssl_timing_path = os.environ.get(ENV_TIMING)
            self.medssl_step_ends: list[float] = []
            self.print_to_log_file(
                f"{TRAINER_NAME}: {total} iterations budgeted -> {self.num_epochs} epochs x "
                f"{self.num_iterations_per_epoch} iterations, 1 pseudo-Dice batch per epoch, no final validation")

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            self.medssl_step_ends.append(time.perf_counter())
            return out

        def on_epoch_end(self) -> None:
            super().on_epoch_end()
            if self.medssl_timing_path:
                with open(self.medssl_timing_path, "w") as f:
                    json.dump({"epochs": self.num_epochs, "iterations_per_epoch": self.num_iterations_per_epoch,
                               "batch_size": self.batch_size, "step_ends": self.medssl_step_ends}, f)

        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            self.print_to_log_file(f"{TRAINER_NAME}: final validation on the training cases skipped")
