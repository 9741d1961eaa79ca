"""Does `medssl predict`'s background reading/writing pay? ``predict(prefetch=True)`` vs ``prefetch=False``.

Runs :func:`medssl.deploy.predict.predict` on the same real volumes with the same loaded model, alternating
the two modes ``--repeats`` times (first a warm-up call), and prints the median seconds per volume of each and
their ratio, then the median per-volume time of each stage (read + preprocess, inference, writing) from the
reports: sequential costs about their sum, overlapped about their maximum. The model is a finetune run (``--model``: best.pt, run folder, MLflow URI) or, by default, the
tiny 2-step SegResNet of the deploy tests (``tests/deploy/_finetuned.py``), whose compute is small next to
reading: the least favourable case for overlap on a CPU, the most typical on a GPU.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/predict_overlap.py --n 20 --repeats 3
    .venv/bin/python benchmarks/predict_overlap.py --model runs/ft/checkpoints/best.pt --device cuda --n 40
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="finetune checkpoint / run folder / URI (default: tiny test run)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD-layout folder with imagesTr/")
    ap.add_argument("--n", type=int, default=20, help="volumes per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tta", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from benchmarks._machine import cpu_model
    from medssl.deploy.model import load_model
    from medssl.deploy.predict import predict

    images = sorted((args.data / "imagesTr").glob("*.nii.gz"))[-args.n:]
    with tempfile.TemporaryDirectory(prefix="medssl_overlap_") as tmp:
        source = args.model
        if source is None:
            from tests.deploy._finetuned import finetune_seg

            _, source = finetune_seg(args.data, Path(tmp) / "ft")
        model = load_model(source, device=args.device)
        predict(model, images[:2], Path(tmp) / "warm", device=args.device)  # warm-up (imports, allocator)
        times: dict[bool, list[float]] = {True: [], False: []}
        stages: list[dict[str, float]] = []
        for r in range(args.repeats):
            for prefetch in (True, False) if r % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                res = predict(model, images, Path(tmp) / f"out_{prefetch}_{r}", device=args.device, tta=args.tta,
                              prefetch=prefetch)
                times[prefetch].append((time.perf_counter() - t0) / len(images))
                assert res.exit_code == 0, res.failed
                stages.append(json.loads(res.report_path.read_text())["stages"])
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"CPU: {cpu_model()}  device: {args.device}  volumes: {len(images)}  repeats: {args.repeats}")
    print(f"prefetch on : {on:.3f} s/volume  {times[True]}")
    print(f"prefetch off: {off:.3f} s/volume  {times[False]}")
    print(f"speed-up    : {off / on:.2f}x")
    for key in ("read_s", "infer_s", "write_s"):  # per-stage sums of every call, per volume
        print(f"{key[:-2]:<12}: {statistics.median(s[key] for s in stages) / len(images):.3f} s/volume")


if __name__ == "__main__":
    main()
