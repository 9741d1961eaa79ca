"""Finetuning metrics: Dice and HD95 per class (segmentation), AUC / accuracy / balanced accuracy
(classification). MONAI computes the per-case values; this module only aggregates them into flat dicts
whose keys become MLflow metric names after a ``val_`` / ``test_`` prefix.
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

__all__ = ["SegmentationMetrics", "classification_metrics", "evaluate_model", "as_tensor", "SELECTION_METRIC"]

log = logging.getLogger(__name__)

#: metric each task selects the best checkpoint (and stops early) on; higher is better
SELECTION_METRIC = {"segmentation": "dice_mean", "classification": "auc"}


class SegmentationMetrics:
    """Accumulates per-case Dice and HD95 (mm) of foreground classes ``1..num_classes-1``.

    Args:
        num_classes: classes including background (hippocampus: 3).

    Use: ``m.update(logits, label, spacing)`` per case, then ``m.compute()`` →
    ``{"dice_1", "dice_2", "dice_mean", "hd95_1", "hd95_2", "hd95_mean"}``. Dice of a class absent from
    both prediction and ground truth is skipped (MONAI ``ignore_empty``); HD95 of a case whose prediction
    or ground truth lacks the class is undefined (NaN, skipped in the means; ``inf`` becomes NaN too). A
    class with no defined value at all reports NaN.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {num_classes}")
        self.num_classes = int(num_classes)
        self.dice = DiceMetric(include_background=False, reduction="none")
        self.hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._hd: list[torch.Tensor] = []

    def update(
        self, logits: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None
    ) -> None:
        """Add cases.

        Args:
            logits: ``(B, K, D, H, W)`` network output (argmax is taken).
            label: ``(B, 1, D, H, W)`` class indices.
            spacing: voxel size in mm ``(x, y, z)`` for HD95 (``None``: voxels).
        """
        k = self.num_classes
        pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=k)
        gt = one_hot(label.long(), num_classes=k)
        with warnings.catch_warnings():  # MONAI warns for every empty class; we report NaN instead
            warnings.simplefilter("ignore")
            self._dice.append(self.dice(pred, gt).detach().cpu().float())
            kw = {"spacing": [float(s) for s in spacing]} if spacing is not None else {}
            hd = self.hd95(pred, gt, **kw).detach().cpu().float()
        self._hd.append(torch.where(torch.isfinite(hd), hd, torch.full_like(hd, float("nan"))))

    def compute(self) -> dict[str, float]:
        """Means over cases per class and over classes (NaN-aware)."""
        out: dict[str, float] = {}
        for name, vals in (("dice", self._dice), ("hd95", self._hd)):
            if not vals:
                raise ValueError("no cases were added")
            per_class = torch.nanmean(torch.cat(vals), dim=0)  # (K-1,)
            for c, v in enumerate(per_class.tolist(), start=1):
                out[f"{name}_{c}"] = float(v)
            finite = per_class[~per_class.isnan()]
            out[f"{name}_mean"] = float(finite.mean()) if finite.numel() else math.nan
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
