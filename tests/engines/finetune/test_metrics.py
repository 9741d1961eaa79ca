"""Finetuning metrics (medssl/engines/finetune/metrics.py) against analytic values and naive references."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.engines.finetune.metrics import SegmentationMetrics, classification_metrics, image_diagonal_mm


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


DIAG16 = math.sqrt(3 * 16**2)  # diagonal of the 16³ test volume in voxels


def test_collapsed_class_is_penalised_and_lowers_the_means() -> None:
    pred = _cubes()
    pred[pred == 2] = 0  # class 2 never predicted (a collapsed class)
    m = SegmentationMetrics(3)
    m.update(_logits(pred), _cubes())
    out = m.compute()
    assert out["dice_1"] == pytest.approx(1.0) and out["dice_2"] == 0.0
    assert out["dice_mean"] == pytest.approx(0.5)  # over ALL foreground classes, not only the predicted one
    assert out["hd95_1"] == pytest.approx(0.0) and out["hd95_2"] == pytest.approx(DIAG16)
    assert out["hd95_mean"] == pytest.approx(DIAG16 / 2)  # the penalty is in the mean, not dropped
    assert out["missed_2"] == 1 and out["missed_1"] == 0 and out["hd95_penalised_2"] == 1
    m.update(_logits(_cubes()), _cubes())  # a second, perfect case: per-class means over cases
    out = m.compute()
    assert out["dice_2"] == pytest.approx(0.5) and out["hd95_2"] == pytest.approx(DIAG16 / 2)
    assert out["missed_2"] == 1 and out["cases"] == 2
    # the penalty is the diagonal in mm: anisotropic spacing (x, y, z) along (D, H, W)
    m = SegmentationMetrics(3)
    m.update(_logits(pred), _cubes(), spacing=(1.0, 2.0, 3.0))
    assert m.compute()["hd95_2"] == pytest.approx(math.sqrt(16**2 + 32**2 + 48**2))
    assert image_diagonal_mm((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)  # BraTS
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(1)


def test_empty_ground_truth_false_positive_and_both_empty() -> None:
    gt = _cubes()
    gt[gt == 2] = 0  # class 2 absent from the ground truth ...
    m = SegmentationMetrics(3)
    m.update(_logits(_cubes()), gt)  # ... but predicted: false positives
    out = m.compute()
    assert out["dice_2"] == 0.0 and out["hd95_2"] == pytest.approx(DIAG16)
    assert out["missed_2"] == 0 and out["hd95_penalised_2"] == 1 and out["dice_mean"] == pytest.approx(0.5)
    m.reset()
    m.update(_logits(gt), gt)  # absent from both: a perfect answer
    out = m.compute()
    assert out["dice_2"] == 1.0 and out["hd95_2"] == 0.0 and out["hd95_penalised_2"] == 0
    assert out["dice_mean"] == 1.0 and out["hd95_mean"] == 0.0
    # a volume predicted all background against an all-background label: every class both-empty
    m.reset()
    empty = torch.zeros(1, 1, 8, 8, 8)
    m.update(_logits(empty), empty, spacing=(0.5, 0.5, 0.5))
    assert m.compute()["dice_mean"] == 1.0 and m.compute()["hd95_mean"] == 0.0
    with pytest.raises(ValueError, match="no cases"):
        SegmentationMetrics(2).compute()


def test_no_nan_or_inf_in_any_case() -> None:
    g = torch.Generator().manual_seed(0)
    m = SegmentationMetrics(4)
    spacing = (1.5, 1.0, 2.0)

    def sparse() -> torch.Tensor:  # a few voxels of one random class, often none at all
        mask = (torch.rand(1, 1, 8, 8, 8, generator=g) < 0.05).float()
        return mask * torch.randint(1, 4, (1,), generator=g)

    for _ in range(6):  # classes randomly missing from the prediction, the ground truth or both
        m.update(_logits(sparse(), 4), sparse(), spacing=spacing)
    out = m.compute()
    assert all(math.isfinite(v) for v in out.values()), out
    assert 0.0 <= out["dice_mean"] <= 1.0 and out["hd95_mean"] <= image_diagonal_mm((8, 8, 8), spacing)


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
