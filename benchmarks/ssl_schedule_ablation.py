"""Ablation of the finetuning schedule for pretrained weights (``FinetuneConfig.ssl_schedule``, issue 12 item 4).

Finetunes the SSL arm of an existing study (its ingested data, splits and pretrained encoder) with
``ssl_schedule: none`` and with ``auto`` at several ``encoder_lr_scale`` values, on the given fractions and seeds,
with the pipeline's ``finetune`` section otherwise unchanged; prints Markdown tables per schedule of the best
VALIDATION metric (what a schedule is chosen on) and of the test metric (reported, never chosen on), mean and per
seed, and writes ``ablation.json``. Scratch arms are not rerun: compare with the study's.

    python benchmarks/ssl_schedule_ablation.py pipelines/label_efficiency.yaml \\
        --study-dir ../studies/runs/sweeps/hippocampus-label-efficiency --out ../studies/ssl_schedule_ablation

    # the SparK-UNet study (its datalist is label_efficiency.yaml's), one fraction and seed, from studies/:
    OMP_NUM_THREADS=1 python ../benchmarks/ssl_schedule_ablation.py ../pipelines/label_efficiency_spark_unet.yaml \\
        --study-dir runs/sweeps/hippocampus-label-efficiency-spark-unet --out ssl_schedule_ablation_spark_unet \\
        --fractions 10 --seeds 0 --scales 1.0 --schedules none,auto@1

Cost: one SSL finetuning run per (schedule, fraction, seed): with the defaults 4 × 2 × 3 = 24 runs of the
pipeline's 400 steps, about 2–4 min each on 2 CPU cores, so 1–1.5 h. Runs resume (``resume="auto"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import run_finetune

log = logging.getLogger("ssl_schedule_ablation")


def _schedules(scales: list[float]) -> dict[str, Any]:
    return {"none": "none"} | {f"auto@{s:g}": {"encoder_lr_scale": s} for s in scales}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path, help="the study's pipeline YAML (its finetune section is used)")
    ap.add_argument("--study-dir", type=Path, required=True,
                    help="the sweep's study folder: sweep/pretrain/encoder.pt, and data/{datalist,splits}.json unless the "
                         "pipeline names data.datalist (then its folder holds splits.json)")
    ap.add_argument("--encoder", type=Path, help="SSL encoder.pt (default: <study-dir>/sweep/pretrain/encoder.pt)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fractions", default="5,10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scales", default="0.25,0.5,1.0", help="encoder_lr_scale values of the auto schedule")
    ap.add_argument("--metric", default="dice_mean")
    ap.add_argument("--schedules", default=None,
                    help="comma-separated subset of the schedule names to run (e.g. 'none,auto@1'); default all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    spec = yaml.safe_load(args.pipeline.read_text())
    base = dict(spec["finetune"])
    given = (spec.get("data") or {}).get("datalist")  # a study on an existing datalist: its splits.json beside it
    data = Path(given).parent if given else args.study_dir / "data"
    encoder = args.encoder or args.study_dir / "sweep" / "pretrain" / "encoder.pt"
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    val_results: dict[str, dict[str, float]] = {}
    schedules = _schedules([float(s) for s in args.scales.split(",")])
    if args.schedules:
        wanted = args.schedules.split(",")
        unknown = [w for w in wanted if w not in schedules]
        if unknown:
            ap.error(f"unknown schedule(s) {unknown}; valid: {sorted(schedules)}")
        schedules = {k: v for k, v in schedules.items() if k in wanted}
    for name, sched in schedules.items():
        for frac in fractions:
            for seed in seeds:
                key = f"f{frac:g}-s{seed}"
                extra = (spec.get("finetune_by_fraction") or {}).get(int(frac) if frac.is_integer() else frac, {})
                cfg = FinetuneConfig.from_dict(base | extra | {
                    "datalist": str(data / "datalist.json"), "splits": str(data / "splits.json"),
                    "fraction": frac, "seed": seed, "init": f"ssl:{encoder}", "ssl_schedule": sched,
                    "out_dir": str(args.out / name.replace("@", "_") / key), "experiment": None})
                res = run_finetune(cfg, resume="auto", progress=False)
                results.setdefault(name, {})[key] = float(res.test_metrics[args.metric])
                val_results.setdefault(name, {})[key] = float(res.best_val.get(args.metric, float("nan")))
                (args.out / "ablation.json").write_text(
                    json.dumps({"test": results, "validation": val_results}, indent=1))
    for title, table in (("best validation", val_results), ("test", results)):
        print(f"\n{title} {args.metric}\n")
        print(f"| schedule | {' | '.join(f'{f:g} %' for f in fractions)} | per seed |")
        print("|---|" + "---|" * len(fractions) + "---|")
        for name, vals in table.items():
            means = [np.mean([vals[f"f{f:g}-s{s}"] for s in seeds]) for f in fractions]
            print(f"| {name} | {' | '.join(f'{m:.4f}' for m in means)} | "
                  f"{', '.join(f'{k} {v:.3f}' for k, v in vals.items())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
