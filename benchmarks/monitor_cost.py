"""Cost of the pretraining representation monitor vs the pretraining steps it watches, on real data.

Builds the pretraining engine of a pipeline's ``pretrain`` section (default: the hippocampus study,
``pipelines/label_efficiency.yaml``) on the MSD hippocampus cases beside the checkout (image + label, so the
monitor has its labelled probe cases), then times: building the probe set once, one monitor evaluation
(median of ``--evals``), and one pretraining step (median of ``--steps`` after one warm-up step). Prints
the overhead of monitoring every ``--every`` steps: ``eval_s / (every * step_s)``. ``--datalist`` (and
``--splits``) use an ingested datalist instead, e.g. AdrenalMNIST3D with
``--pipeline pipelines/classification_adrenal.yaml``.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/monitor_cost.py --every 100 --cases 32
    medssl ingest ../shared/datasets/medmnist3d/adrenalmnist3d.npz --out /tmp/adrenal
    medssl split /tmp/adrenal/datalist.json --fractions 1,10,100 --seeds 0,1,2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/monitor_cost.py --pipeline pipelines/classification_adrenal.yaml \
        --datalist /tmp/adrenal/datalist.json --splits /tmp/adrenal/splits.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "label_efficiency.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MSD Task04 folder (imagesTr, labelsTr)")
    ap.add_argument("--n-volumes", type=int, default=60)
    ap.add_argument("--datalist", default=None, help="an ingested datalist instead of --data")
    ap.add_argument("--splits", default=None, help="its splits.json (the pool is then pretrain_pool)")
    ap.add_argument("--cases", type=int, default=32, help="monitor_cases")
    ap.add_argument("--every", type=int, default=100, help="monitor_every whose overhead is reported")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks._machine import cpu_model
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain import Pretrainer, build_components
    from medssl.engines.pretrain.monitor import build_monitor

    data = Path(args.data)
    files = sorted((data / "imagesTr").glob("*.nii*"))[: args.n_volumes]
    items = [{"image": str(f), "label": str(data / "labelsTr" / f.name), "case_id": f.name} for f in files]
    tmp = Path(tempfile.mkdtemp(prefix="monitor_cost_"))
    dl = Path(args.datalist) if args.datalist else tmp / "datalist.json"
    if not args.datalist:
        dl.write_text(json.dumps({"training": items}))
    spec = yaml.safe_load(Path(args.pipeline).read_text())["pretrain"]
    cfg = PretrainConfig.from_dict({**spec, "datalist": str(dl), "splits": args.splits, "out_dir": str(tmp / "run"), "experiment": None,
                                    "preview": False, "device": "cpu", "monitor_every": args.every,
                                    "monitor_cases": args.cases})
    torch.manual_seed(0)
    trainer = Pretrainer(cfg, *build_components(cfg))
    trainer.method.train()
    t0 = time.perf_counter()
    monitor = build_monitor(cfg, trainer.pool, trainer.device)
    build_s = time.perf_counter() - t0
    evals = []
    for _ in range(args.evals):
        t0 = time.perf_counter()
        monitor.evaluate(trainer.encoder)
        evals.append(time.perf_counter() - t0)
    trainer.train_step()  # warm-up: fills the volume cache
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - t0)
    eval_s, step_s = statistics.median(evals), statistics.median(steps)
    out = {
        "pipeline": Path(args.pipeline).name, "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "encoder": cfg.encoder, "encoder_kwargs": cfg.encoder_kwargs, "roi_size": cfg.roi_size,
        "batch_size": cfg.batch_size, "probe": monitor.describe(), "build_s": round(build_s, 2),
        "eval_s": round(eval_s, 2), "step_s": round(step_s, 3), "every": args.every,
        "overhead": round(eval_s / (args.every * step_s), 4),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
