"""Pretraining steps/s: medssl's engine vs a naive MONAI-tutorial-style loop, side by side in one run.

Both train the same SSL method + encoder with the same batch size B, view size and AdamW optimiser,
on the same volumes (default: the MSD hippocampus MRI crops beside the checkout).

- **naive**: the MONAI self-supervised tutorial pattern (``self_supervised_pretraining/vit_unetr_ssl``):
  a ``Dataset`` re-reading every NIfTI file each epoch through per-sample MONAI transforms
  (LoadImaged → EnsureChannelFirstd → Orientationd → ScaleIntensityRangePercentilesd → SpatialPadd →
  RandSpatialCropSamplesd(num_samples=2) → CopyItemsd → OneOf(RandCoarseDropoutd ×2) →
  RandCoarseShuffled, for both views), a torch ``DataLoader`` (``B/2`` volumes × 2 samples) with
  ``list_data_collate``, then forward / backward / step.
- Timing: after warm-up (for medssl: one epoch that fills the cache, reported separately), the loops
  run in interleaved rounds of ``--steps`` steps; the median steps/s per loop is reported, so the
  load of other processes on a shared machine affects every loop alike.
- **medssl**: :class:`medssl.engines.pretrain.engine.Pretrainer` (cached normalised volumes, restorable crop
  stream, ``BatchedSSLAugment`` on the whole batch, the same step as ``medssl pretrain``).

Model-side options (same for both loops unless noted): ``--threads`` (``torch.set_num_threads``),
``--cpu-bf16`` (bf16 autocast in both loops), ``--channels-last auto|on|off`` (the engine's
``channels_last``; ``auto`` is its default, on for fp32 CPU runs; the tutorial loop stays in the
default format unless ``--naive-channels-last`` adds a second naive loop that uses it too).

Usage::

    .venv/bin/python benchmarks/pretrain_step.py --steps 10 --rounds 5 --n-volumes 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
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


class NaiveLoop:
    """The tutorial-style loop; :meth:`step` runs one optimizer step."""

    def __init__(
        self, args: argparse.Namespace, pool: list[dict], workers: int, channels_last: bool = False
    ) -> None:
        from monai.data import DataLoader, Dataset, list_data_collate

        self.method = build_model(args, (args.roi,) * 3)
        self.channels_last, self.bf16 = channels_last, args.cpu_bf16
        if channels_last:
            self.method.to(memory_format=torch.channels_last_3d)
        self.opt = torch.optim.AdamW(self.method.parameters(), lr=1e-4)
        loader = DataLoader(
            Dataset(pool, naive_transforms(args.roi)),
            batch_size=args.batch // 2,
            shuffle=True,
            num_workers=workers,
            collate_fn=list_data_collate,
            persistent_workers=workers > 0,
            drop_last=True,
        )

        def forever():
            while True:
                yield from loader

        self.batches = forever()

    def data(self) -> dict[str, torch.Tensor]:
        """One batch, data side only (read + transforms + collate)."""
        b = next(self.batches)
        return {
            "view1": b["image"],
            "view2": b["image_2"],
            "view1_target": b["gt_image"],
            "view2_target": b["gt_image"],
        }

    def step(self) -> None:
        batch = self.data()
        if self.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last_3d) for k, v in batch.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.method(batch)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class MedsslLoop:
    """:class:`~medssl.engines.pretrain.engine.Pretrainer` (what ``medssl pretrain`` runs), no tracking."""

    def __init__(self, args: argparse.Namespace, datalist: Path, out: Path) -> None:
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
            cpu_bf16=args.cpu_bf16,
            channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
        )
        torch.manual_seed(0)
        self.trainer = Pretrainer(cfg, *build_components(cfg))
        self.trainer.method.train()
        self.channels_last = self.trainer.channels_last

    def step(self) -> None:
        self.trainer.train_step()

    def data(self) -> dict[str, torch.Tensor]:
        """One batch, data side only (next cached volumes + batched augmentation)."""
        return self.trainer.augment(self.trainer.batcher.next_batch(self.trainer.cfg.batch_size))


def model_only(args: argparse.Namespace) -> None:
    """``--model-only``: steps/s of forward + backward + AdamW step on one fixed random batch, for the
    model-side variants (fp32, channels_last_3d, bf16 autocast, both, and with ``--compile`` also
    ``torch.compile``), in interleaved rounds; prints the first step's time (compile) and loss."""
    roi = (args.roi,) * 3
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.rand(args.batch, 1, *roi, generator=g) for k in ("view1", "view2")}
    raw |= {"view1_target": raw["view1"], "view2_target": raw["view2"]}
    variants = ["fp32", "channels_last", "bf16", "channels_last+bf16"]
    variants += ["compile", "channels_last+compile"] if args.compile else []
    steps, rates = {}, {}
    for v in variants:
        method = build_model(args, roi).train()
        batch = raw
        if "channels_last" in v:
            method.to(memory_format=torch.channels_last_3d)
            batch = {k: t.contiguous(memory_format=torch.channels_last_3d) for k, t in raw.items()}
        opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
        fwd = torch.compile(method) if "compile" in v else method

        def step(fwd=fwd, opt=opt, batch=batch, bf16="bf16" in v) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        t0 = time.perf_counter()
        first = step()
        print(f"{v}: first step {time.perf_counter() - t0:.1f} s, loss {first:.5f}")
        steps[v], rates[v] = step, []
    for _ in range(args.rounds):
        for v in variants:
            rates[v].append(timed(steps[v], args.steps))
    print("| variant | steps/s (median) | per round |\n|---|---|---|")
    for v in variants:
        print(f"| {v} | {statistics.median(rates[v]):.2f} | {' '.join(f'{x:.2f}' for x in rates[v])} |")


def timed(fn, steps: int) -> float:
    """Calls/s of ``fn`` over ``steps`` calls."""
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of NIfTI volumes")
    ap.add_argument("--n-volumes", type=int, default=40)
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--encoder", default="segresnet")
    ap.add_argument("--encoder-kwargs", default='{"init_filters": 8, "blocks_down": [1, 1, 1, 1]}')
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", default="0", help="DataLoader workers of the naive loop (comma list)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU in both loops")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="engine option")
    ap.add_argument("--naive-channels-last", action="store_true", help="add a naive loop in channels_last_3d")
    ap.add_argument("--model-only", action="store_true", help="time model-side variants only (no data)")
    ap.add_argument("--compile", action="store_true", help="with --model-only: add torch.compile variants")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_only:
        print(f"{args.method} + {args.encoder} {args.encoder_kwargs}, B={args.batch}, {args.roi}^3, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        model_only(args)
        return
    files = sorted(args.data.glob("*.nii*"))[: args.n_volumes]
    if not files:
        raise SystemExit(f"no NIfTI files under {args.data}")
    pool = [{"image": str(f), "case_id": f.name} for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        datalist = Path(tmp) / "datalist.json"
        datalist.write_text(json.dumps({"unlabeled": pool}))
        engine = MedsslLoop(args, datalist, Path(tmp) / "r")
        loops = {
            "medssl engine (cached volumes + BatchedSSLAugment"
            + (", channels_last_3d)" if engine.channels_last else ")"): engine
        }
        for w in (int(x) for x in args.workers.split(",")):
            loops[f"naive MONAI tutorial loop, DataLoader num_workers={w}"] = NaiveLoop(args, pool, w)
        if args.naive_channels_last:
            loops["naive loop + channels_last_3d"] = NaiveLoop(
                args, pool, int(args.workers.split(",")[0]), True
            )
        medssl_name = next(iter(loops))
        cold_steps = -(-len(files) // args.batch)  # one epoch: fills the medssl cache
        cold = timed(loops[medssl_name].step, cold_steps)
        for name, loop in loops.items():
            if name != medssl_name:
                timed(loop.step, args.warmup)
        # interleaved rounds (A B C A B C ...) so load drift on a shared machine hits every loop alike
        rates: dict[str, list[float]] = {k: [] for k in loops}
        data_rates: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                rates[name].append(timed(loop.step, args.steps))
        for _ in range(args.rounds):  # the data side alone: batches/s without the model
            for name, loop in loops.items():
                data_rates[name].append(timed(loop.data, 5 * args.steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    data_med = {k: statistics.median(v) for k, v in data_rates.items()}
    best_naive = max(v for k, v in med.items() if k != medssl_name)
    from medssl.engines.pretrain.components import cpu_has_native_bf16

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"config: {args.method} + {args.encoder} {args.encoder_kwargs}, B={args.batch}, views {args.roi}^3, "
        f"{len(files)} volumes from {args.data}, {args.rounds} interleaved rounds x {args.steps} steps "
        f"(data only: x {5 * args.steps}); cpu_bf16={args.cpu_bf16}, engine channels_last="
        f"{args.channels_last}, bf16-native CPU: {cpu_has_native_bf16()}"
    )
    print("| loop | steps/s (median) | per round | vs best naive |\n|---|---|---|---|")
    for k, v in med.items():
        rounds = " ".join(f"{x:.2f}" for x in rates[k])
        print(f"| {k} | {v:.2f} | {rounds} | {v / best_naive:.2f}x |")
    print(
        f"| medssl engine, first epoch ({cold_steps} steps, cold cache: reads + normalises every volume) "
        f"| {cold:.2f} | | {cold / best_naive:.2f}x |"
    )
    best_data = max(v for k, v in data_med.items() if k != medssl_name)
    print(
        "\n| data side only (no model) | batches/s (median) | per round | vs best naive |\n|---|---|---|---|"
    )
    for k, v in data_med.items():
        rounds = " ".join(f"{x:.1f}" for x in data_rates[k])
        print(f"| {k} | {v:.1f} | {rounds} | {v / best_data:.1f}x |")


if __name__ == "__main__":
    main()
