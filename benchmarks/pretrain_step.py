"""Pretraining steps/s: medssl's engine vs a naive MONAI-tutorial-style loop, side by side in one run.

Both train the same SSL method + encoder with the same batch size B, view size and AdamW optimiser,
on the same volumes (default: the MSD hippocampus MRI crops beside the checkout).

- **naive**: the MONAI self-supervised tutorial pattern (``self_supervised_pretraining/vit_unetr_ssl``):
  a ``Dataset`` re-reading every NIfTI file each epoch through per-sample MONAI transforms
  (LoadImaged → EnsureChannelFirstd → Orientationd → ScaleIntensityRangePercentilesd → SpatialPadd →
  RandSpatialCropSamplesd(num_samples=2) → CopyItemsd → OneOf(RandCoarseDropoutd ×2) →
  RandCoarseShuffled, for both views), a torch ``DataLoader`` (``B/2`` volumes × 2 samples) with
  ``list_data_collate``, then forward / backward / step.
- **medssl**: :class:`medssl.engines.pretrain.Pretrainer` (cached normalised volumes, restorable crop
  stream, ``BatchedSSLAugment`` on the whole batch, the same step as ``medssl pretrain``), timed after
  one warm-up epoch that fills the cache (its time is reported separately).

Usage::

    .venv/bin/python benchmarks/pretrain_step.py --steps 30 --n-volumes 40
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus" / "imagesTr"


def naive_transforms(roi: int):
    from monai.transforms import (
        Compose,
        CopyItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        OneOf,
        Orientationd,
        RandCoarseDropoutd,
        RandCoarseShuffled,
        RandSpatialCropSamplesd,
        ScaleIntensityRangePercentilesd,
        SpatialPadd,
    )

    s = roi / 64  # the tutorial's hole sizes are for 64³ crops; scaled to the view size

    def holes(key: str) -> list:
        return [
            OneOf(
                [
                    RandCoarseDropoutd(
                        key,
                        prob=1.0,
                        holes=6,
                        spatial_size=max(1, int(5 * s)),
                        dropout_holes=True,
                        max_spatial_size=int(32 * s),
                    ),
                    RandCoarseDropoutd(
                        key,
                        prob=1.0,
                        holes=6,
                        spatial_size=int(20 * s),
                        dropout_holes=False,
                        max_spatial_size=int(64 * s),
                    ),
                ]
            ),
            RandCoarseShuffled(key, prob=0.8, holes=10, spatial_size=max(1, int(8 * s))),
        ]

    return Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            SpatialPadd("image", spatial_size=(roi, roi, roi)),
            RandSpatialCropSamplesd("image", roi_size=(roi, roi, roi), random_size=False, num_samples=2),
            CopyItemsd("image", times=2, names=["gt_image", "image_2"]),
            *holes("image"),
            *holes("image_2"),
        ]
    )


def build_model(args: argparse.Namespace, roi: tuple[int, int, int]) -> torch.nn.Module:
    from medssl.methods.base import build_method
    from medssl.networks.encoders import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(args.encoder, in_channels=1, img_size=roi, **json.loads(args.encoder_kwargs))
    return build_method(args.method, enc)


def run_naive(args: argparse.Namespace, pool: list[dict], workers: int) -> float:
    """Steps/s of the tutorial-style loop with ``workers`` DataLoader workers."""
    from monai.data import DataLoader, Dataset, list_data_collate

    roi = (args.roi,) * 3
    method = build_model(args, roi)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    ds = Dataset(pool, naive_transforms(args.roi))
    loader = DataLoader(
        ds,
        batch_size=args.batch // 2,
        shuffle=True,
        num_workers=workers,
        collate_fn=list_data_collate,
        persistent_workers=workers > 0,
        drop_last=True,
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    t0, done = 0.0, 0
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            t0 = time.perf_counter()
        b = next(it)
        batch = {
            "view1": b["image"],
            "view2": b["image_2"],
            "view1_target": b["gt_image"],
            "view2_target": b["gt_image"],
        }
        loss = method(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += i >= args.warmup
    return done / (time.perf_counter() - t0)


def run_medssl(args: argparse.Namespace, datalist: Path, out: Path) -> tuple[float, float]:
    """Steps/s of the medssl engine after a warm-up epoch; also the warm-up epoch's steps/s (cold cache)."""
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain import Pretrainer, build_components

    cfg = PretrainConfig(
        datalist=str(datalist),
        method=args.method,
        encoder=args.encoder,
        encoder_kwargs=json.loads(args.encoder_kwargs),
        roi_size=[args.roi] * 3,
        batch_size=args.batch,
        lr=1e-4,
        total_steps=10**6,
        device="cpu",
        out_dir=str(out),
        experiment=None,
        preview=False,
        grad_clip=None,
    )
    torch.manual_seed(0)
    trainer = Pretrainer(cfg, *build_components(cfg))
    trainer.method.train()
    warm = max(args.warmup, -(-args.n_volumes // args.batch))  # one epoch: every volume cached
    t0 = time.perf_counter()
    for _ in range(warm):
        trainer.train_step()
    cold = warm / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    return args.steps / (time.perf_counter() - t0), cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of NIfTI volumes")
    ap.add_argument("--n-volumes", type=int, default=40)
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--encoder", default="segresnet")
    ap.add_argument("--encoder-kwargs", default='{"init_filters": 8, "blocks_down": [1, 1, 1, 1]}')
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", default="0,2", help="DataLoader workers of the naive loop (comma list)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = sorted(args.data.glob("*.nii*"))[: args.n_volumes]
    if not files:
        raise SystemExit(f"no NIfTI files under {args.data}")
    pool = [{"image": str(f), "case_id": f.name} for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        datalist = Path(tmp) / "datalist.json"
        datalist.write_text(json.dumps({"unlabeled": pool}))
        ours, cold = run_medssl(args, datalist, Path(tmp) / "run")
        naive = {w: run_naive(args, pool, w) for w in (int(x) for x in args.workers.split(","))}
    best = max(naive.values())
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"config: {args.method} + {args.encoder} {args.encoder_kwargs}, B={args.batch}, views {args.roi}^3, "
        f"{len(files)} volumes from {args.data.name}, {args.steps} timed steps"
    )
    print("| loop | steps/s | vs best naive |\n|---|---|---|")
    for w, v in naive.items():
        print(f"| naive MONAI tutorial loop, DataLoader num_workers={w} | {v:.2f} | {v / best:.2f}x |")
    print(f"| medssl engine, first epoch (cold cache, loads from disk) | {cold:.2f} | {cold / best:.2f}x |")
    print(f"| medssl engine, steady state (cached) | {ours:.2f} | {ours / best:.2f}x |")


if __name__ == "__main__":
    main()
