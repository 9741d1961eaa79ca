"""Seconds per finetuning step of a pipeline's recipe, and the ``max_steps`` that fits a time budget.

Builds the pipeline's finetuning run (planned ``"auto"`` fields resolved as at run start) on a dataset in MSD
layout, times ``--steps`` optimizer steps including data loading and one validation, and prints the
``max_steps`` for which one run (set-up + steps + validations every ``val_every_steps`` + the test set) takes
``--minutes``. Nothing is logged to MLflow; the run folder is a temporary directory.

Measure on a quiet machine: the load average before and after and torch's thread count are printed. On 2 cores a
step of the planned UNet takes about 0.35 s with 2 threads when nothing else runs, but 3–8 s with 2 threads when
another process shares the cores (OpenMP threads wait on each other), and about 1.2 s with ``OMP_NUM_THREADS=1``:
background studies on a shared machine should run with one thread.

    python benchmarks/finetune_step_time.py pipelines/recipe_check.yaml \
        --dataset ../shared/datasets/msd_task04_hippocampus --steps 20 --minutes 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from medssl.data.splits import split_datalist
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import epoch_loader, seed_epoch
from medssl.engines.finetune.engine import Finetuner

log = logging.getLogger("finetune_step_time")


def _datalist(dataset: Path, out: Path, test_fraction: float, val_fraction: float) -> tuple[Path, Path]:
    meta = json.loads((dataset / "dataset.json").read_text())
    items = [{"image": str(p), "label": str(dataset / "labelsTr" / p.name), "case_id": p.name.split(".")[0]}
             for p in sorted((dataset / "imagesTr").glob("*.nii.gz"))]
    (out / "datalist.json").write_text(json.dumps({"training": items, "labels": meta.get("labels")}))
    path, _ = split_datalist(out / "datalist.json", fractions=[100], seeds=[0], test_fraction=test_fraction,
                             val_fraction=val_fraction)
    return out / "datalist.json", path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--dataset", type=Path, required=True, help="MSD folder (dataset.json, imagesTr, labelsTr)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=20.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pl = yaml.safe_load(args.pipeline.read_text())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        dl, sp = _datalist(args.dataset, Path(tmp), pl["data"].get("test_fraction", 0.2),
                           pl["data"].get("val_fraction", 0.1))
        fields = {**pl["finetune"], "datalist": str(dl), "splits": str(sp), "fraction": 100, "seed": 0,
                  "max_steps": args.steps, "out_dir": str(Path(tmp) / "run"), "experiment": None}
        t0 = time.perf_counter()
        ft = Finetuner(FinetuneConfig.from_dict(fields))
        setup = time.perf_counter() - t0
        ft.model.train()
        times, epoch = [], 0
        while len(times) < args.steps:
            seed_epoch(ft.train_ds, 0, epoch)
            t = time.perf_counter()
            for batch in epoch_loader(ft.train_ds, ft.cfg.batch_size, 0, epoch):
                ft.train_step(batch)
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
                if len(times) >= args.steps:
                    break
            epoch += 1
        step = sum(times[2:]) / max(1, len(times) - 2)  # the first steps warm caches up
        t = time.perf_counter()
        ft.evaluate(ft.val_ds)
        val = time.perf_counter() - t
        n_val, n_test = len(ft.items["validation"]), len(ft.items["test"])
        test = val * n_test / max(1, n_val)
        every = int(pl["finetune"].get("val_every_steps") or 0) or 10**9
        budget = args.minutes * 60 - setup - test - val  # the final validation
        max_steps = int(budget / (step + val / every))
        print(json.dumps({"resolved": {k: getattr(ft.cfg, k) for k in
                                       ("roi_size", "batch_size", "num_samples", "network_kwargs")},
                          "sampling": ft.sampling, "setup_s": round(setup, 1), "s_per_step": round(step, 3),
                          "validation_s": round(val, 1), "test_s_estimate": round(test, 1),
                          "max_steps_for_budget": max_steps, "minutes": args.minutes,
                          "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
                         indent=1))
    if load_before > 0.5 * (os.cpu_count() or 1):  # before: the measurement itself raises the load
        logging.warning("the machine was busy (load average above half the cores): these times are inflated; "
                        "re-measure on a quiet machine")


if __name__ == "__main__":
    main()
