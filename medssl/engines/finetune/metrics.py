"""Finetuning metrics: Dice and HD95 per class (segmentation), AUC / accuracy / balanced accuracy
(classification). MONAI computes the per-case values; this module fixes the conventions for empty masks (so a
failure can never look like a success) and aggregates them into flat dicts whose keys become MLflow metric names
after a ``val_`` / ``test_`` prefix.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.data import DataLoader
from monai.data.utils import affine_to_spacing
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_roc_auc
from monai.networks.utils import one_hot

__all__ = [
    "SegmentationMetrics",
    "classification_metrics",
    "evaluate_model",
    "as_tensor",
    "image_diagonal_mm",
    "SELECTION_METRIC",
]

log = logging.getLogger(__name__)

#: metric each task selects the best checkpoint (and stops early) on; higher is better
SELECTION_METRIC = {"segmentation": "dice_mean", "classification": "auc"}


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the image diagonal, the HD95 penalty: ``‖shape · spacing‖₂`` in mm (voxels without spacing).

    Example: a ``(240, 240, 155)`` volume at 1 mm → ``√(240² + 240² + 155²) = 373.13`` mm, the value BraTS
    assigns to the HD95 of a missed (or hallucinated) tumour region.
    """
    sp = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    if len(sp) != len(shape):
        raise ValueError(f"spacing {tuple(sp)} does not match the spatial shape {tuple(shape)}")
    return math.sqrt(math.fsum((n * s) ** 2 for n, s in zip(shape, sp, strict=True)))


class SegmentationMetrics:
    """Accumulates per-case Dice and HD95 (mm) of the foreground classes ``1..num_classes-1``.

    Conventions, per case and class, chosen so that a collapsed or hallucinated class is penalised and no
    value is ever NaN or ``inf``:

    ====================  ==========================  =============================================
    ground truth          prediction                  Dice / HD95
    ====================  ==========================  =============================================
    present               present                     MONAI ``DiceMetric`` / ``HausdorffDistanceMetric``
    present               empty (class *missed*)      0 / image diagonal in mm (penalty)
    empty                 present (false positives)   0 / image diagonal in mm (penalty)
    empty                 empty                       1 / 0
    ====================  ==========================  =============================================

    Dice is MONAI ``DiceMetric(ignore_empty=False)`` (MONAI's default ``ignore_empty=True`` gives NaN for an
    empty ground truth, which then drops out of the mean; nnU-Net's evaluation likewise reports NaN for
    both-empty and skips it). MONAI has no option for an empty side of HD95 (it returns ``inf``/NaN), so the
    penalty is set here: the image diagonal ``‖shape · spacing‖₂`` (:func:`image_diagonal_mm`), the BraTS
    convention (373.13 mm for its 240 × 240 × 155 grid).

    Aggregation: ``dice_<c>`` / ``hd95_<c>`` are means over cases; ``dice_mean`` / ``hd95_mean`` are the means of
    these over **all** foreground classes (equal to the mean over cases of the per-case class means, since no
    value is undefined). ``missed_<c>`` counts cases whose ground truth holds class ``c`` but whose prediction
    does not (a collapsed class shows here); ``hd95_penalised_<c>`` counts cases that got the HD95 penalty
    (missed or false-positive-only). ``cases`` is the number of cases.

    Args:
        num_classes: classes including background (hippocampus: 3).

    Use: ``m.update(logits, label, spacing)`` per case (or batch), then ``m.compute()``.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {num_classes}")
        self.num_classes = int(num_classes)
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self.reset()

    def reset(self) -> None:
        """Forget every case."""
        self._dice: list[torch.Tensor] = []
        self._hd: list[torch.Tensor] = []
        self._missed: list[torch.Tensor] = []
        self._penalised: list[torch.Tensor] = []

    def update(
        self, logits: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None
    ) -> None:
        """Add cases.

        Args:
            logits: ``(B, K, D, H, W)`` network output (argmax is taken).
            label: ``(B, 1, D, H, W)`` class indices.
            spacing: voxel size in mm along ``(D, H, W)`` (NIfTI ``x, y, z``) for HD95 and its penalty
                (``None``: voxels).
        """
        k = self.num_classes
        pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=k)
        gt = one_hot(label.long(), num_classes=k)
        pred_any = pred[:, 1:].flatten(2).any(dim=2).cpu()  # (B, K-1)
        gt_any = gt[:, 1:].flatten(2).any(dim=2).cpu()
        penalty = image_diagonal_mm(tuple(label.shape[2:]), spacing)
        with warnings.catch_warnings():  # MONAI warns per empty class; handled below
            warnings.simplefilter("ignore")
            dice = self.dice(pred, gt).detach().cpu().float()
            kw = {"spacing": [float(s) for s in spacing]} if spacing is not None else {}
            hd = self.hd95(pred, gt, **kw).detach().cpu().float()
        measured = pred_any & gt_any & torch.isfinite(hd)  # MONAI's value is defined
        penalised = (pred_any | gt_any) & ~measured  # exactly one side empty
        hd = torch.where(measured, hd, torch.where(penalised, penalty, 0.0))
        self._dice.append(dice)
        self._hd.append(hd)
        self._missed.append(gt_any & ~pred_any)
        self._penalised.append(penalised)

    def compute(self) -> dict[str, float]:
        """``dice_<c>``, ``dice_mean``, ``hd95_<c>``, ``hd95_mean``, ``missed_<c>``, ``hd95_penalised_<c>``,
        ``cases`` (see the class docstring).

        Raises:
            ValueError: no case was added.
        """
        if not self._dice:
            raise ValueError("no cases were added")
        out: dict[str, float] = {}
        for name, vals in (("dice", self._dice), ("hd95", self._hd)):
            per_class = torch.cat(vals).double().mean(dim=0)  # (K-1,)
            for c, v in enumerate(per_class.tolist(), start=1):
                out[f"{name}_{c}"] = float(v)
            out[f"{name}_mean"] = float(per_class.mean())
        for name, vals in (("missed", self._missed), ("hd95_penalised", self._penalised)):
            for c, v in enumerate(torch.cat(vals).sum(dim=0).tolist(), start=1):
                out[f"{name}_{c}"] = float(v)
        out["cases"] = float(sum(len(d) for d in self._dice))
        return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, accuracy and balanced accuracy of ``(N, K)`` logits against ``(N,)`` class indices.

    AUC: ROC AUC of the positive-class probability for ``K = 2``, macro average of one-vs-rest AUCs
    otherwise (MONAI ``compute_roc_auc``); NaN when the labels hold a single class. Balanced accuracy:
    mean recall over the classes present in ``labels``.
    """
    labels = labels.long().reshape(-1).cpu()
    probs = torch.softmax(logits.float().cpu(), dim=1)
    k = probs.shape[1]
    pred = probs.argmax(dim=1)
    present = labels.unique()
    recalls = [float((pred[labels == c] == c).float().mean()) for c in present.tolist()]
    if present.numel() < 2:
        log.warning("AUC undefined: the labels hold a single class %s", present.tolist())
        auc = math.nan
    elif k == 2:
        auc = float(compute_roc_auc(probs[:, 1], labels))
    else:
        auc = float(compute_roc_auc(probs, one_hot(labels[:, None], num_classes=k, dim=1)))
    return {
        "auc": auc,
        "accuracy": float((pred == labels).float().mean()),
        "balanced_accuracy": sum(recalls) / len(recalls),
    }


def as_tensor(x: Any) -> torch.Tensor:
    """Plain tensor of a (Meta)tensor or array (MONAI's metadata is not needed by the network)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    task: str,
    num_classes: int,
    inferer: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
) -> dict[str, float]:
    """Metrics of ``model`` (put in ``eval()`` mode) on a dataset of preprocessed items.

    Args:
        model: segmentation net ``(B, C, D, H, W) → (B, K, D, H, W)`` or classifier ``→ (B, K)``.
        dataset: items ``{"image": MetaTensor (C, X, Y, Z), "label": MetaTensor (1, X, Y, Z) | int}``.
        task: ``"segmentation"`` (one case at a time through ``inferer``, e.g. ``SlidingWindowInferer``;
            HD95 in mm from the image affine) or ``"classification"`` (batches of ``batch_size``).
        num_classes: segmentation classes including background (K).
        amp_dtype: autocast dtype on CUDA, or ``None``.

    Returns:
        :meth:`SegmentationMetrics.compute` or :func:`classification_metrics` (unprefixed names).
    """
    model.eval()
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    if task == "segmentation":
        metrics = SegmentationMetrics(num_classes)
        for batch in DataLoader(dataset, batch_size=1, num_workers=num_workers):
            image = batch["image"]
            spacing = affine_to_spacing(image.affine[0], r=3).tolist() if hasattr(image, "affine") else None
            with autocast():
                logits = inferer(as_tensor(image).to(device), model)
            metrics.update(logits.float().cpu(), as_tensor(batch["label"]), spacing)
        return metrics.compute()
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        with autocast():
            logits.append(model(as_tensor(batch["image"]).to(device)).float().cpu())
        labels.append(as_tensor(batch["label"]).reshape(-1))
    return classification_metrics(torch.cat(logits), torch.cat(labels))
