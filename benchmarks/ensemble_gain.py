"""Does averaging the softmax of several finetuned runs beat one of them? Paired per seed, on a study's fixed test set
(``--cases test``) or on the seed's unlabeled pool (``--cases pool``: the quality of ensemble pseudo-labels).

    python benchmarks/ensemble_gain.py SWEEP_DIR --fraction 5 --arms scratch ssl --seeds 0 1 2 [--cases pool] [--tta]

``SWEEP_DIR`` is a study's ``sweep/`` folder (children ``f<fraction>-<arm>-s<seed>``). For each seed every arm's
child predicts the cases alone (``medssl predict``), then all of them as one ensemble (``medssl predict --ensemble``:
the members' softmax mean), and each label map is scored against the case's true label with the per-case Dice of
``benchmarks/pseudo_label_quality.py`` (mean over the foreground classes, on the volume's own grid). The arms of a
seed share its labelled cases and validation set, so an ensemble uses no extra labels — only extra training runs.
Pool cases are labelled in datasets like hippocampus (their labels hidden from the runs); this script is analysis
only and reads them. Prints a Markdown table (per seed, each arm and the ensemble) and the paired mean ± 95 % CI of
ensemble − first arm over the seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from medssl.data.splits import fraction_key, load_splits
from medssl.deploy.predict import predict
from medssl.engines.finetune.data import finetune_items
from medssl.engines.finetune.pseudo import pool_ids
from medssl.tracking.stats import format_summary, mean_ci, paired_difference

_spec = importlib.util.spec_from_file_location("pseudo_label_quality", Path(__file__).with_name("pseudo_label_quality.py"))
_plq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_plq)
case_dice = _plq.case_dice


def _cases(config: dict[str, Any], which: str) -> list[dict[str, Any]]:
    """Items ``{"case_id", "image", "label"}`` (absolute paths) of the fixed test set or the seed's pool."""
    items = finetune_items(config["datalist"], config["splits"], fraction=float(config["fraction"]),
                           seed=int(config["seed"]), task="segmentation")
    if which == "test":
        return items["test"]
    ids = pool_ids(load_splits(config["splits"]), int(config["seed"]), "seed",
                   [it["case_id"] for it in items["training"]])
    labelled = _plq.labelled_cases(Path(config["datalist"]))
    return [{"case_id": c, **labelled[c]} for c in ids if c in labelled]


def _scores(res: Any, cases: list[dict[str, Any]], classes: list[int]) -> dict[str, float]:
    """case id → Dice of ``predict``'s label maps (cases are staged as ``<case id>.nii.gz``)."""
    truth = {c["case_id"]: c["label"] for c in cases}
    out = {}
    for row in res.ok:
        pred = np.asarray(nib.load(row["outputs"]["seg"]).dataobj)
        out[row["case"]] = case_dice(pred, np.asarray(nib.load(truth[row["case"]]).dataobj), classes)
    return out


def seed_row(sweep: Path, fraction: float, arms: list[str], seed: int, work: Path, *, which: str, tta: bool,
             classes: list[int]) -> dict[str, float]:
    """Mean Dice of each arm's child and of their ensemble on one seed's cases: ``{arm: value, "ensemble": value}``."""
    runs = [sweep / f"f{fraction_key(fraction)}-{a}-s{seed}" for a in arms]
    missing = [str(r) for r in runs if not (r / "checkpoints" / "best.pt").is_file()]
    if missing:
        raise SystemExit(f"no finished child at {missing} (checkpoints/best.pt)")
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    cases = _cases(config, which)
    stage = work / f"s{seed}" / "inputs"
    stage.mkdir(parents=True, exist_ok=True)
    for c in cases:  # named by case id: files of different folders may share a name
        link = stage / f"{c['case_id']}.nii.gz"
        if not link.exists():
            link.symlink_to(c["image"])
    row: dict[str, float] = {}
    for arm, run in zip(arms, runs, strict=True):
        res = predict(run / "checkpoints" / "best.pt", [stage], work / f"s{seed}" / arm, tta=tta)
        row[arm] = float(np.mean(list(_scores(res, cases, classes).values())))
    res = predict([r / "checkpoints" / "best.pt" for r in runs], [stage], work / f"s{seed}" / "ensemble", tta=tta)
    row["ensemble"] = float(np.mean(list(_scores(res, cases, classes).values())))
    row["cases"] = len(cases)
    return row


def report(rows: dict[int, dict[str, float]], arms: list[str], *, fraction: float, which: str) -> str:
    """Markdown: one row per seed, then the paired ensemble − first arm over the seeds."""
    head = f"| {fraction:g} %, {which} cases | " + " | ".join(arms) + f" | ensemble | ensemble − {arms[0]} |"
    lines = [head, "|---" * (len(arms) + 3) + "|"]
    for seed, r in sorted(rows.items()):
        cells = [f"{r[a]:.4f}" for a in arms] + [f"{r['ensemble']:.4f}", f"{r['ensemble'] - r[arms[0]]:+.4f}"]
        lines.append(f"| seed {seed} ({int(r['cases'])}) | " + " | ".join(cells) + " |")
    means = [format_summary(mean_ci([r[a] for r in rows.values()]), 4) for a in [*arms, "ensemble"]]
    d = paired_difference({s: r["ensemble"] for s, r in rows.items()}, {s: r[arms[0]] for s, r in rows.items()})
    lines.append("| mean ± 95 % CI | " + " | ".join(means) + f" | {format_summary(d, 4) if d else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="the study's sweep/ folder")
    ap.add_argument("--fraction", type=float, required=True)
    ap.add_argument("--arms", nargs="+", required=True, help="at least two arms, e.g. scratch ssl (first = reference)")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--cases", choices=("test", "pool"), default="test")
    ap.add_argument("--tta", action="store_true", help="test-time flips (as the study's tta: true)")
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 2], help="foreground classes (hippocampus: 1 2)")
    ap.add_argument("--workdir", type=Path, default=Path("ensemble_gain"))
    args = ap.parse_args(argv)
    if len(args.arms) < 2:
        ap.error("--arms needs at least two arms")
    rows = {s: seed_row(args.sweep, args.fraction, args.arms, s, args.workdir, which=args.cases, tta=args.tta,
                        classes=args.classes) for s in args.seeds}
    md = report(rows, args.arms, fraction=args.fraction, which=args.cases)
    print(md)
    return md


if __name__ == "__main__":
    main()
