"""Score a written label map against a reference label (the demo's held-back case, ``benchmarks/predict.py``).

Dice per foreground class with MONAI's ``compute_dice(ignore_empty=False)``: the conventions of
:class:`medssl.engines.finetune.metrics.SegmentationMetrics` (a class empty in both maps scores 1, in exactly one 0), on
the native grid of the files, which must share shape and affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medssl.errors import MedsslError

__all__ = ["dice_per_class", "score_files"]


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class ``1..num_classes-1``.

    Args:
        pred: ``(X, Y, Z)`` integer class indices.
        label: ``(X, Y, Z)`` integer class indices, same shape.
        num_classes: classes including background (hippocampus: 3).

    Returns:
        ``{class index: Dice in [0, 1]}``.

    Raises:
        MedsslError: the shapes differ or ``num_classes < 2``.
    """
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    if pred.shape != label.shape:
        raise MedsslError(f"prediction shape {pred.shape} differs from the label's {label.shape}")
    if num_classes < 2:
        raise MedsslError(f"num_classes must be >= 2 (background + 1), got {num_classes}")
    p = one_hot(torch.as_tensor(np.asarray(pred, np.int64))[None, None], num_classes=num_classes)
    g = one_hot(torch.as_tensor(np.asarray(label, np.int64))[None, None], num_classes=num_classes)
    d = compute_dice(p, g, include_background=False, ignore_empty=False)[0]  # (K-1,)
    return {c: float(v) for c, v in enumerate(d.tolist(), start=1)}


def score_files(pred_path: str | Path, label_path: str | Path, num_classes: int) -> dict[str, float]:
    """Dice of a written label map against a reference label file.

    Returns:
        ``{"dice_1", …, "dice_mean"}`` (mean over the foreground classes).

    Raises:
        MedsslError: the two files differ in shape or affine (|difference| > 1e-4 mm), naming both.
    """
    from medssl.data.nifti import load_nifti

    pred, ref = load_nifti(pred_path), load_nifti(label_path)
    if pred.array.shape != ref.array.shape or not np.allclose(pred.affine, ref.affine, atol=1e-4):
        raise MedsslError(f"{pred_path} (shape {pred.array.shape}) is not on the grid of {label_path} "
                          f"(shape {ref.array.shape}) or their affines differ")
    dice = dice_per_class(np.rint(pred.array).astype(np.int64), np.rint(ref.array).astype(np.int64), num_classes)
    return {f"dice_{c}": v for c, v in dice.items()} | {"dice_mean": float(np.mean(list(dice.values())))}
