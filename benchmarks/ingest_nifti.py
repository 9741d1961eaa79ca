"""Hippocampus NIfTI ingest throughput (volumes/s) with 1 and 2 worker processes, side by side in one run.

Usage: python benchmarks/ingest_nifti.py [--data ../shared/datasets/msd_task04_hippocampus] [--repeats 3]
Prints a markdown table (append it to benchmarks/RESULTS.md with the machine line).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _machine import cpu_model  # benchmarks/ is sys.path[0] when a script runs

from medssl.data.ingest import IngestOptions, ingest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for workers in (1, 2):
        times = []
        n = 0
        for _ in range(args.repeats):
            out = Path(tempfile.mkdtemp(prefix="medssl-bench-"))
            t0 = time.perf_counter()
            rep = ingest([args.data], out, workers=workers, options=IngestOptions(salt="bench"))
            times.append(time.perf_counter() - t0)
            n = rep.n_accepted
            shutil.rmtree(out)
        med = statistics.median(times)
        rows.append((workers, n, med, n / med))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print("command: python benchmarks/ingest_nifti.py --repeats", args.repeats)
    print("\n| workers | volumes | median s | volumes/s | speed-up |\n| --- | --- | --- | --- | --- |")
    for w, n, med, vps in rows:
        print(f"| {w} | {n} | {med:.2f} | {vps:.1f} | {vps / rows[0][3]:.2f}× |")


if __name__ == "__main__":
    main()
