"""GPU suite, part 2: pretraining steps/s of the library's engine, bf16 autocast vs fp32.

Each ``method:encoder`` pair runs in :class:`medssl.engines.pretrain.engine.Pretrainer` (exactly the step of
``medssl pretrain``: cached volumes, ``BatchedSSLAugment`` on the device, AdamW, grad clipping) twice,
``amp=None`` and ``amp="bf16"``. Every trainer first runs one epoch (fills its cache, cuDNN picks its
kernels; reported as ``cold_steps_s``), then all trainers run in interleaved rounds of ``--steps``
steps (A B C D A B C D …) so load drift hits every variant alike; the median steps/s is reported with
the samples/s (``batch_size`` volumes, two views each for the contrastive methods), the last loss and
the peak GPU memory. ``spark`` (masked image modelling for CNN U-Nets) is added automatically when the
library registers it.

Writes ``pretrain_gpu.json`` and ``pretrain_gpu.md`` into ``--out``.

    python benchmarks/gpu_pretrain.py --data $MEDSSL_DATASETS/msd_task04_hippocampus --out gpu_out
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import hippocampus_images, machine, md_table, sync_for, write_part  # noqa: E402

from medssl.config import PretrainConfig  # noqa: E402
from medssl.engines.pretrain import Pretrainer, build_components  # noqa: E402
from medssl.methods.base import METHODS  # noqa: E402

__all__ = ["main", "default_pairs"]

log = logging.getLogger("gpu_pretrain")
PART = "pretrain_gpu"
# the study's GPU encoder (pipelines/label_efficiency_gpu.yaml)
SEGRESNET = {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
ENCODER_KWARGS = {"segresnet": SEGRESNET, "segresnet_unet": SEGRESNET}  # others: the encoder's defaults


def default_pairs() -> str:
    """SimCLR + SegResNet, Models Genesis + UNet, and SparK + the SegResNet U-Net where registered."""
    pairs = ["simclr:segresnet", "genesis:unet"]
    if "spark" in METHODS:
        pairs.append("spark:segresnet_unet")
    return ",".join(pairs)


def build_trainer(pair: str, amp: str | None, args: argparse.Namespace, datalist: Path, out: Path) -> Pretrainer:
    """A :class:`Pretrainer` for ``method:encoder`` with ``amp``; no MLflow, no checkpoints."""
    method, encoder = pair.split(":")
    kwargs = json.loads(args.encoder_kwargs).get(encoder, {})
    cfg = PretrainConfig(
        datalist=str(datalist),
        method=method,
        encoder=encoder,
        encoder_kwargs=kwargs,
        roi_size=[args.roi] * 3,
        batch_size=args.batch,
        lr=1e-4,
        total_steps=10**6,
        device=args.device,
        amp=amp,
        out_dir=str(out),
        experiment=None,
        preview=False,
        seed=0,
    )
    torch.manual_seed(0)
    trainer = Pretrainer(cfg, *build_components(cfg))
    trainer.method.train()
    return trainer


def timed_steps(trainer: Pretrainer, steps: int, sync: Any) -> tuple[float, float | None]:
    """Steps/s of ``steps`` engine steps and the last finite loss."""
    sync()
    t0, loss = time.perf_counter(), None
    for _ in range(steps):
        logs = trainer.train_step()
        if logs is not None:
            loss = logs["loss"]
    sync()
    return steps / (time.perf_counter() - t0), loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD hippocampus folder (imagesTr/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", default=None, help="method:encoder list (default: see default_pairs)")
    ap.add_argument("--encoder-kwargs", default=json.dumps(ENCODER_KWARGS), help="JSON {encoder: kwargs}")
    ap.add_argument("--n-volumes", type=int, default=140, help="pool size (the study's pretraining pool)")
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="recorded in the JSON (tiny CPU sizes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    sync = sync_for(dev)
    files = hippocampus_images(args.data, args.n_volumes)
    pairs = (args.pairs or default_pairs()).split(",")
    amps: list[str | None] = [None, "bf16"]
    rows: dict[str, dict[str, Any]] = {}
    trainers: dict[str, Pretrainer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        datalist = Path(tmp) / "datalist.json"
        datalist.write_text(json.dumps({"unlabeled": [{"image": str(f), "case_id": f.name} for f in files]}))
        for pair in pairs:
            for amp in amps:
                key = f"{pair}:{amp or 'fp32'}"
                row = rows[key] = {"method": pair.split(":")[0], "encoder": pair.split(":")[1],
                                   "precision": amp or "fp32", "batch": args.batch, "roi": args.roi}
                try:
                    tr = build_trainer(pair, amp, args, datalist, Path(tmp) / key.replace(":", "_"))
                    row["amp_effective"] = tr.amp_dtype is not None
                    row["params_M"] = sum(p.numel() for p in tr.method.parameters()) / 1e6
                    cold = -(-len(files) // args.batch)  # one epoch: fills the cache
                    row["cold_steps_s"], _ = timed_steps(tr, cold, sync)
                    trainers[key] = tr
                    row["steps_s_rounds"], row["status"] = [], "ok"
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others run
                    log.exception("%s failed", key)
                    row["status"] = f"failed: {type(e).__name__}: {e}"[:500]
        for _ in range(args.rounds):  # interleaved rounds
            for key, tr in list(trainers.items()):
                try:
                    rate, loss = timed_steps(tr, args.steps, sync)
                    rows[key]["steps_s_rounds"].append(rate)
                    rows[key]["last_loss"] = loss
                except Exception as e:  # noqa: BLE001
                    log.exception("%s failed", key)
                    rows[key]["status"] = f"failed: {type(e).__name__}: {e}"[:500]
                    del trainers[key]
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**30
        for row in rows.values():
            if row["status"] == "ok":
                row["steps_s"] = statistics.median(row["steps_s_rounds"])
                row["samples_s"] = row["steps_s"] * args.batch
    for pair in pairs:  # bf16 speed-up over fp32 of the same pair
        fp32, bf16 = rows.get(f"{pair}:fp32", {}), rows.get(f"{pair}:bf16", {})
        if fp32.get("steps_s") and bf16.get("steps_s"):
            bf16["bf16_speedup"] = bf16["steps_s"] / fp32["steps_s"]
    cmd = "python benchmarks/gpu_pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine(dev)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    payload = {
        "dry_run": args.dry_run,
        "command": cmd,
        "machine": facts,
        "n_volumes": len(files),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "peak_gpu_memory_gib_all_variants": peak if dev.type == "cuda" else None,
        "rows": list(rows.values()),
        "wall_s": time.perf_counter() - t_start,
    }
    where = facts["gpu"] or f"{dev.type} ({facts['cpu']})"
    md = [
        f"### Pretraining steps/s on {where}, bf16 vs fp32 (issue 12, GPU suite part 2)"
        + (" — DRY RUN" if args.dry_run else ""),
        "",
        f"`{cmd}`; torch {facts['torch']}, CUDA {facts['cuda']}; the engine's step (`Pretrainer.train_step`: "
        f"cached volumes, batched augmentation on the device, AdamW, grad clip 1.0), B = {args.batch}, views "
        f"{args.roi}³, {len(files)} hippocampus volumes; median of {args.rounds} interleaved rounds × "
        f"{args.steps} steps after one cold epoch.",
        "",
        md_table(
            ["method + encoder", "precision", "params (M)", "steps/s", "samples/s", "bf16 ×", "cold epoch steps/s",
             "last loss", "status"],
            [[f"{r['method']} + {r['encoder']}", r["precision"] + (" (ignored: not CUDA)" if r["precision"] != "fp32"
                                                                   and not r.get("amp_effective") else ""),
              r.get("params_M"), r.get("steps_s"), r.get("samples_s"), r.get("bf16_speedup"),
              r.get("cold_steps_s"), r.get("last_loss"), r["status"]] for r in rows.values()],
        ),
    ]
    write_part(args.out, PART, payload, "\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
