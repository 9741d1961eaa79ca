"""benchmarks/pseudo_label_quality.py: Dice of pseudo-labels against the pool cases' true labels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_plq", REPO / "benchmarks" / "pseudo_label_quality.py")
plq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plq)


def test_dice_of_pseudo_labels_against_the_hidden_truth(tmp_path: Path) -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    truth[2:] = 2
    half = truth.copy()
    half[0] = 0  # class 1 loses half its voxels: Dice 2·16 / (16 + 32) = 2/3; class 2 exact
    items = []
    run = tmp_path / "run"
    (run / "pseudo_labels").mkdir(parents=True)
    for case, pred in (("a", truth), ("b", half)):
        nib.save(nib.Nifti1Image(truth, np.eye(4)), tmp_path / f"{case}_label.nii.gz")
        nib.save(nib.Nifti1Image(pred, np.eye(4)), run / "pseudo_labels" / f"{case}_seg.nii.gz")
        items.append({"image": "x.nii.gz", "label": f"{case}_label.nii.gz", "case_id": case})
    items.append({"image": "y.nii.gz", "case_id": "unlabeled"})  # no truth: not scored
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items}))
    (run / "pseudo_labels" / "manifest.json").write_text(json.dumps({"cases": ["a", "b", "unlabeled", "failed"]}))
    rows = plq.main([str(run), "--datalist", str(tmp_path / "datalist.json")])
    assert rows[0]["cases"] == 2
    assert rows[0]["dice_mean"] == pytest.approx((1.0 + (2 / 3 + 1.0) / 2) / 2)
    assert rows[0]["dice_min"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert plq.case_dice(truth, truth, [1, 2, 3]) == 1.0  # a class absent from both counts as 1
