"""``medssl.bundles.classify.ClassPredictionWriter`` on hand-made evaluator outputs (the bundle run itself:
``test_finetune_cls_inference.py``)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.data import MetaTensor

from medssl.bundles.classify import ClassPredictionWriter
from medssl.errors import MedsslError


def _engine(*cases: tuple[str, list[float]]) -> SimpleNamespace:
    out = [{"pred": torch.tensor(p), "image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": f})}
           for f, p in cases]
    return SimpleNamespace(state=SimpleNamespace(output=out))


def test_rows_name_case_class_and_probabilities(tmp_path: Path) -> None:
    w = ClassPredictionWriter(tmp_path / "pred", {"0": "benign", "1": "malignant"})
    w.collect(_engine(("/d/a_01.nii.gz", [0.2, 0.8]), ("/d/B.NII", [0.9, 0.1])))
    with w.write().open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["case"], r["pred_class"], r["pred_name"]) for r in rows] == [
        ("/d/a_01.nii.gz", "a_01", "1", "malignant"), ("/d/B.NII", "B", "0", "benign")]
    assert [float(rows[0]["prob_benign"]), float(rows[0]["prob_malignant"])] == pytest.approx([0.2, 0.8])


def test_wrong_class_count_and_empty_run_are_refused_naming_the_file(tmp_path: Path) -> None:
    w = ClassPredictionWriter(tmp_path, {"0": "benign", "1": "malignant"})
    with pytest.raises(MedsslError, match=r"/d/c\.nii\.gz: prediction of 3 values but 2 classes"):
        w.collect(_engine(("/d/c.nii.gz", [0.2, 0.3, 0.5])))
    with pytest.raises(MedsslError, match="no case was predicted"):
        w.write()
    assert not (tmp_path / "predictions.csv").exists()


def test_class_names_must_be_the_indices_0_to_k_minus_1(tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match=r"class_names keys must be the class indices 0..K-1, got \[1, 2\]"):
        ClassPredictionWriter(tmp_path, {"1": "benign", "2": "malignant"})
    with pytest.raises(MedsslError, match="class_names keys must be class indices 0..K-1, got .*benign"):
        ClassPredictionWriter(tmp_path, {"benign": "b", "0": "m"})
