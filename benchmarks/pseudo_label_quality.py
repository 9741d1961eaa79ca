"""How good a self-training run's pseudo-labels are: mean Dice (per foreground class, then over classes) of each
``RUN/pseudo_labels/<case>_seg.nii.gz`` against the pool case's true label in the datalist.

Analysis only, for studies whose pool cases happen to be labelled (e.g. hippocampus, where the "unlabeled" pool
is labelled cases with their labels hidden): the finetuning engine never reads those labels.

    python benchmarks/pseudo_label_quality.py --datalist DATALIST RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.engines.finetune.data import _resolve, datalist_by_case


def case_dice(pred: np.ndarray, truth: np.ndarray, classes: list[int]) -> float:
    """Mean over ``classes`` of Dice(pred == k, truth == k); a class absent from both counts as 1."""
    out = []
    for k in classes:
        a, b = pred == k, truth == k
        denom = int(a.sum() + b.sum())
        out.append(1.0 if denom == 0 else 2.0 * float((a & b).sum()) / denom)
    return float(np.mean(out))


def labelled_cases(datalist: Path) -> dict[str, dict[str, str]]:
    """case id → ``{"image", "label"}`` (absolute paths) of the cases whose datalist item has a label file (the
    finetuning engine's lookup, :func:`~medssl.engines.finetune.data.datalist_by_case`: the first item of a case id)."""
    return {c: {k: str(_resolve(it[k], datalist.parent)) for k in ("image", "label")}
            for c, it in datalist_by_case(datalist).items()
            if isinstance(it.get("label"), str) and isinstance(it.get("image"), str)}


def run_quality(run: Path, datalist: Path, classes: list[int]) -> dict[str, float | int | str]:
    """``{"run", "cases", "dice_mean", "dice_min"}`` of ``run``'s pseudo-labels (cases of its ``manifest.json``)."""
    items = labelled_cases(datalist)
    folder = run / "pseudo_labels"
    manifest = json.loads((folder / "manifest.json").read_text())
    dice = []
    for case in manifest["cases"]:
        seg = folder / f"{case}_seg.nii.gz"
        if not seg.is_file() or case not in items:
            continue  # left out by the teacher, or a truly unlabeled case
        pred, truth = np.asarray(nib.load(seg).dataobj), np.asarray(nib.load(items[case]["label"]).dataobj)
        dice.append(case_dice(pred, truth, classes))
    return {"run": run.name, "cases": len(dice), "dice_mean": float(np.mean(dice)) if dice else float("nan"),
            "dice_min": float(np.min(dice)) if dice else float("nan")}


def main(argv: list[str] | None = None) -> list[dict[str, float | int | str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--datalist", type=Path, required=True)
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 2], help="foreground classes (hippocampus: 1 2)")
    args = ap.parse_args(argv)
    rows = [run_quality(r, args.datalist, args.classes) for r in args.runs]
    for r in rows:
        print(f"{r['run']}: {r['cases']} cases, pseudo-label Dice {r['dice_mean']:.4f} (min {r['dice_min']:.3f})")
    return rows


if __name__ == "__main__":
    main()
