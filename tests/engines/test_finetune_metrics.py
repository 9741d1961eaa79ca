"""Finetuning metrics (medssl/engines/metrics.py) against analytic values and naive references."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.engines.metrics import SegmentationMetrics, classification_metrics


def _logits(label: torch.Tensor, k: int = 3) -> torch.Tensor:
    """``(1, 1, D, H, W)`` class map → one-hot logits ``(1, k, D, H, W)``."""
    return torch.nn.functional.one_hot(label[0, 0].long(), k).permute(3, 0, 1, 2)[None].float()


def _cubes(shift: int = 0) -> torch.Tensor:
    y = torch.zeros(1, 1, 16, 16, 16)
    y[..., 2 + shift : 6 + shift, 2:6, 2:6] = 1  # class 1: 4³ cube
    y[..., 9:13, 9:13, 9:13] = 2  # class 2: 4³ cube
    return y


def test_perfect_and_shifted_segmentation() -> None:
    m = SegmentationMetrics(3)
    m.update(_logits(_cubes()), _cubes())
    out = m.compute()
    assert out["dice_1"] == out["dice_2"] == out["dice_mean"] == pytest.approx(1.0)
    assert out["hd95_mean"] == pytest.approx(0.0)
    m.reset()
    m.update(_logits(_cubes(shift=2)), _cubes())  # class 1 shifted by 2 voxels: overlap 2·4·4 of 64
    out = m.compute()
    assert out["dice_1"] == pytest.approx(2 * 32 / 128) and out["dice_2"] == pytest.approx(1.0)
    assert out["dice_mean"] == pytest.approx(0.75)
    assert out["hd95_1"] > 0 and out["hd95_2"] == pytest.approx(0.0)
    m2 = SegmentationMetrics(3)
    m2.update(_logits(_cubes(shift=2)), _cubes(), spacing=(2.0, 2.0, 2.0))  # isotropic mm: distances double
    assert m2.compute()["hd95_1"] == pytest.approx(2 * out["hd95_1"])


def test_missing_class_gives_nan_hd_not_inf() -> None:
    pred = _cubes()
    pred[pred == 2] = 0  # class 2 never predicted
    m = SegmentationMetrics(3)
    m.update(_logits(pred), _cubes())
    m.update(_logits(_cubes()), _cubes())
    out = m.compute()
    assert out["dice_2"] == pytest.approx(0.5)  # mean of 0 and 1 over the two cases
    assert out["hd95_2"] == pytest.approx(0.0)  # undefined case skipped, the other is perfect
    m.reset()
    m.update(_logits(pred), _cubes())
    out = m.compute()
    assert math.isnan(out["hd95_2"]) and out["hd95_mean"] == pytest.approx(out["hd95_1"])
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(1)


def _naive_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_classification_metrics_against_references() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 2, generator=g)
    labels = torch.randint(0, 2, (40,), generator=g)
    out = classification_metrics(logits, labels)
    p1 = torch.softmax(logits, 1)[:, 1]
    assert out["auc"] == pytest.approx(_naive_auc(p1.tolist(), labels.tolist()))
    pred = logits.argmax(1)
    assert out["accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    recall = [float((pred[labels == c] == c).float().mean()) for c in (0, 1)]
    assert out["balanced_accuracy"] == pytest.approx(sum(recall) / 2)
    # 9 negatives all right, 1 positive wrong: accuracy 0.9 but balanced accuracy 0.5
    logits = torch.tensor([[1.0, 0.0]] * 10)
    out = classification_metrics(logits, torch.tensor([0] * 9 + [1]))
    assert out["accuracy"] == pytest.approx(0.9) and out["balanced_accuracy"] == pytest.approx(0.5)
    assert math.isnan(classification_metrics(logits, torch.zeros(10))["auc"])  # one class: AUC undefined
