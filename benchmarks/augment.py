"""SSL augmentation throughput (two-view pairs/s), side by side in one run, same crop size, same machine.

(a) the MONAI self-supervised tutorial chain (Project-MONAI/tutorials
    ``self_supervised_pretraining/ssl_script_train.py``): LoadImaged → EnsureChannelFirstd → Spacingd →
    ScaleIntensityRanged → CropForegroundd → SpatialPadd → RandSpatialCropSamplesd(num_samples=2) →
    CopyItemsd → per view OneOf(2× RandCoarseDropoutd) → RandCoarseShuffled. One call reads one file and
    yields 2 pairs (``image``, ``image_2``). Adapted only where the crop size / data force it: roi 96³ → 32³
    (hole sizes ×1/3), 2 mm → 1 mm spacing (hippocampus is 1 mm; at 2 mm every volume is smaller than
    the crop), CT window → 0..1000. It includes file loading and resampling, as the tutorial does.
(b) medssl per-sample path: ``ssl_transforms(method, roi, track_meta=False)`` on cached normalised volumes
    (plain tensors, as the pretraining cache stores them), one pair per call.
(c) medssl batched path: ``BatchedSSLAugment.for_method(method, roi)`` on a list of B cached volumes of
    different sizes (padding on the device included), B pairs per call.

Usage: python benchmarks/augment.py [--data DIR] [--n-volumes 40] [--seconds 3] [--rounds 3] [--batch 32]
       [--threads N] [--device cpu|cuda] [--stages]
Prints a markdown table (pairs/s and ratio to (a)) with the machine line; paths run round-robin.
``--stages`` then prints per-stage milliseconds per pair of (b) (each transform of the chain) and (c)
(crop regions, resampled crop, rot90, intensity, restoration/masking).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import monai
import torch
from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    OneOf,
    RandCoarseDropoutd,
    RandCoarseShuffled,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _machine import cpu_model  # noqa: E402 - benchmarks/ is sys.path[0] when a script runs

import medssl.transforms.batched as batched_mod  # noqa: E402
from medssl.engines.pretrain.data import preprocessing  # noqa: E402
from medssl.transforms.batched import BatchedSSLAugment  # noqa: E402
from medssl.transforms.pipelines import ssl_transforms  # noqa: E402

ROI = (32, 32, 32)


def tutorial_chain(roi: int = 32) -> Compose:
    """The tutorial's train transforms, crop-size dependent numbers scaled by ``roi / 96``."""
    s = roi / 96

    def holes(key: str) -> list:
        return [OneOf(transforms=[
            RandCoarseDropoutd(keys=[key], prob=1.0, holes=6, spatial_size=round(5 * s), dropout_holes=True,
                               max_spatial_size=round(32 * s)),
            RandCoarseDropoutd(keys=[key], prob=1.0, holes=6, spatial_size=round(20 * s), dropout_holes=False,
                               max_spatial_size=round(64 * s)),
        ]), RandCoarseShuffled(keys=[key], prob=0.8, holes=10, spatial_size=round(8 * s))]

    return Compose([
        LoadImaged(keys=["image"]),
        EnsureChannelFirstd(keys=["image"]),
        Spacingd(keys=["image"], pixdim=(1.0, 1.0, 1.0), mode=("bilinear")),
        ScaleIntensityRanged(keys=["image"], a_min=0, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=["image"], source_key="image"),
        SpatialPadd(keys=["image"], spatial_size=(roi, roi, roi)),
        RandSpatialCropSamplesd(keys=["image"], roi_size=(roi, roi, roi), random_size=False, num_samples=2),
        CopyItemsd(keys=["image"], times=2, names=["gt_image", "image_2"], allow_missing_keys=False),
        *holes("image"),
        *holes("image_2"),
    ]).set_random_state(0)


def _rate(step: Callable[[], int], seconds: float, sync: Callable[[], None]) -> float:
    """Pairs/s of ``step`` (returns pairs made) over at least ``seconds``."""
    step()  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    default_data = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus"
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--n-volumes", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="simclr,swin,genesis")
    ap.add_argument("--stages", action="store_true", help="also print per-stage ms/pair of (b) and (c)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    files = sorted((args.data / "imagesTr").glob("*.nii.gz"))[: args.n_volumes]
    if not files:
        raise SystemExit(f"no volumes under {args.data}/imagesTr")
    cache_t = preprocessing("robust")  # what the pretraining CacheDataset stores per volume
    t0 = time.perf_counter()
    cached = [cache_t({"image": str(f)})["image"] for f in files]
    cache_s = time.perf_counter() - t0
    cached_dev = [c.to(dev) for c in cached]

    paths: dict[str, Callable[[], int]] = {}
    tut = tutorial_chain(ROI[0])
    it = {"i": 0}

    def run_a() -> int:
        it["i"] += 1
        return len(tut({"image": str(files[it["i"] % len(files)])}))  # num_samples=2 pairs per file

    paths["(a) MONAI tutorial chain (incl. file loading)"] = run_a
    for m in args.methods.split(","):
        t = ssl_transforms(m, ROI, seed=0, track_meta=False)

        def run_b(t: Compose = t) -> int:
            it["i"] += 1
            t({"image": cached[it["i"] % len(cached)]})
            return 1

        paths[f"(b) medssl per-sample `{m}` (cached volumes)"] = run_b
    for m in args.methods.split(","):
        aug = BatchedSSLAugment.for_method(m, ROI, seed=0)

        def run_c(aug: BatchedSSLAugment = aug) -> int:
            it["i"] += 1
            start = (it["i"] * args.batch) % len(cached_dev)
            vols = [cached_dev[(start + j) % len(cached_dev)] for j in range(args.batch)]
            aug(vols)
            return args.batch

        paths[f"(c) medssl batched `{m}` B={args.batch} on {dev.type}"] = run_c

    plain = BatchedSSLAugment(ROI, seed=0, n_views=2, min_overlap=0.2, max_overlap=0.9, flip_prob=0.5,
                              scale_prob=0.5, shift_prob=0.5, noise_prob=0.3)

    def run_plain() -> int:
        it["i"] += 1
        start = (it["i"] * args.batch) % len(cached_dev)
        plain([cached_dev[(start + j) % len(cached_dev)] for j in range(args.batch)])
        return args.batch

    paths[f"(c') medssl batched crop+flip+scale/shift+noise only, B={args.batch} on {dev.type}"] = run_plain
    rates: dict[str, list[float]] = {k: [] for k in paths}
    t_all = time.perf_counter()
    for _ in range(args.rounds):
        for name, step in paths.items():
            rates[name].append(_rate(step, args.seconds, sync))
    wall = time.perf_counter() - t_all
    cmd = "python benchmarks/augment.py " + " ".join(sys.argv[1:])
    print(f"command: `{cmd.strip()}`")
    print(f"machine: nproc={os.cpu_count()}, {cpu_model()}, torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), monai {monai.__version__}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"roi {ROI}, {len(files)} hippocampus volumes, cache build {cache_s:.1f} s (not timed below), "
          f"{args.rounds} rounds × {args.seconds} s per path round-robin, median reported; "
          f"wall {wall:.0f} s\n")
    print("| path | pairs/s (median) | min–max | × (a) |\n| --- | --- | --- | --- |")
    base = statistics.median(next(iter(rates.values())))
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.1f} | {min(r):.1f}–{max(r):.1f} | {med / base:.1f}× |")
    if args.stages:
        stage_times(args.methods.split(","), cached, cached_dev, args.batch, sync)


def _timed(fn: Callable, acc: dict[str, float], name: str, sync: Callable[[], None]) -> Callable:
    def wrapper(*a: object, **k: object) -> object:
        t0 = time.perf_counter()
        out = fn(*a, **k)
        sync()
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return out
    return wrapper


def stage_times(methods: list[str], cached: list, cached_dev: list, batch: int, sync: Callable[[], None],
                n_pairs: int = 640) -> None:
    """Per-stage ms per pair: (b) each transform of the per-sample chain, (c) the batched stages."""
    from monai.data import set_track_meta
    print("\nper-stage ms per pair (one pass, same process):\n")
    for m in methods:
        t = ssl_transforms(m, ROI, seed=0, track_meta=False)
        acc: dict[str, float] = {}
        set_track_meta(False)
        for i in range(n_pairs // 4):
            d = {"image": cached[i % len(cached)]}
            for tr in t.transforms:
                d = _timed(tr, acc, type(tr).__name__, lambda: None)(d)
        set_track_meta(True)
        total = sum(acc.values()) / (n_pairs // 4) * 1e3
        parts = ", ".join(f"{k} {v / (n_pairs // 4) * 1e3:.3f}"
                          for k, v in sorted(acc.items(), key=lambda x: -x[1]))
        print(f"- (b) `{m}`: {total:.2f} ms/pair = {parts}")
    orig = {k: getattr(batched_mod, k) for k in ("crop_batch", "rotate_batch")}
    try:
        for m in methods:
            aug = BatchedSSLAugment.for_method(m, ROI, seed=0)
            acc = {}
            batched_mod.crop_batch = _timed(orig["crop_batch"], acc, "resampled crop + flips", sync)
            batched_mod.rotate_batch = _timed(orig["rotate_batch"], acc, "rot90", sync)
            aug._regions = _timed(aug._regions, acc, "crop regions", sync)
            aug._intensity = _timed(aug._intensity, acc, "intensity", sync)
            aug._restoration = _timed(aug._restoration, acc, "restoration/masking", sync)
            call = _timed(aug, acc, "total", sync)
            n = max(1, n_pairs // batch)
            for i in range(n):
                call([cached_dev[(i * batch + j) % len(cached_dev)] for j in range(batch)])
            per = {k: v / (n * batch) * 1e3 for k, v in acc.items()}
            total = per.pop("total")
            per["other (boxes, random draws, padding)"] = total - sum(per.values())
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda x: -x[1]))
            print(f"- (c) `{m}` B={batch}: {total:.3f} ms/pair = {parts}")
    finally:
        for k, v in orig.items():
            setattr(batched_mod, k, v)


if __name__ == "__main__":
    main()
