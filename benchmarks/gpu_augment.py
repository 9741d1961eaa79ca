"""GPU suite, part 1: batched SSL augmentation on the GPU vs the MONAI tutorial chain on the CPU, and vs
the model step it feeds.

Reuses ``benchmarks/augment.py`` (the tutorial chain and its pairs/s timer). For each ``method:encoder``
pair it reports, on ``--device`` (default: CUDA when present):

- (a) the MONAI self-supervised tutorial chain on the CPU (one process, file reading included, as in
  ``augment.py``): two-view pairs/s; the issue's goal is (c) ≥ 50× (a);
- (c) ``BatchedSSLAugment.for_method(method, 32³)`` on B cached volumes on the device: pairs/s and
  milliseconds per batch;
- the model's forward + backward + AdamW step on that very augmented batch (fp32, and bf16 autocast on
  CUDA), milliseconds per batch. The augmentation "starves" the model when it takes longer per batch
  than the model step (a prefetching loader could then not keep the GPU busy); ``aug_share`` is its
  share of a sequential step, ``aug / (aug + model)``.

Writes ``augment_gpu.json`` and ``augment_gpu.md`` into ``--out``.

    python benchmarks/gpu_augment.py --out gpu_out                      # GPU: defaults
    python benchmarks/gpu_augment.py --out o --device cpu --n-volumes 8 --batch 4 --seconds 0.3 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import hippocampus_images, machine, md_table, sync_for, write_part  # noqa: E402
from augment import ROI, _rate, tutorial_chain  # noqa: E402  (the tutorial chain and its timer, reused)

from medssl.engines.pretrain.data import preprocessing  # noqa: E402
from medssl.methods.base import build_method  # noqa: E402
from medssl.networks.encoders import build_encoder  # noqa: E402
from medssl.transforms.batched import BatchedSSLAugment  # noqa: E402

__all__ = ["main", "model_step_ms"]

log = logging.getLogger("gpu_augment")
PART = "augment_gpu"
GOAL_X = 50.0  # issue 12: batched GPU augmentation ≥ 50× the tutorial chain on the CPU
# the study's GPU encoder (pipelines/label_efficiency_gpu.yaml); other encoders use their defaults
SEGRESNET = {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
ENCODER_KWARGS = {"segresnet": SEGRESNET}


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor (a MONAI ``MetaTensor`` without its metadata), as the pretraining cache holds it."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def model_step_ms(method: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool, seconds: float,
                  rounds: int, sync) -> list[float]:
    """Milliseconds per forward + backward + AdamW step of ``method`` on the fixed ``batch``, one value per
    round (each round runs for at least ``seconds``; one warm-up step first)."""
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    dev = next(method.parameters()).device
    n = next(iter(batch.values())).shape[0]

    def step() -> int:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return n

    return [1e3 * n / _rate(step, seconds, sync) for _ in range(rounds)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="MSD hippocampus folder (imagesTr/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-volumes", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=1.0, help="per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", default="simclr:segresnet,genesis:unet,swin:swinvit",
                    help="method:encoder pairs (augmentation preset + the model it feeds)")
    ap.add_argument("--encoder-kwargs", default=json.dumps(ENCODER_KWARGS), help="JSON {encoder: kwargs}")
    ap.add_argument("--dry-run", action="store_true", help="recorded in the JSON (tiny CPU sizes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    sync = sync_for(dev)
    files = hippocampus_images(args.data, args.n_volumes)
    cache_t = preprocessing("robust")  # what the pretraining cache stores per volume
    cached = [_plain(cache_t({"image": str(f)})["image"]).to(dev) for f in files]

    tut, it = tutorial_chain(ROI[0]), {"i": 0}

    def run_a() -> int:
        it["i"] += 1
        return len(tut({"image": str(files[it["i"] % len(files)])}))  # 2 pairs per file

    tut_rates = [_rate(run_a, args.seconds, lambda: None) for _ in range(args.rounds)]
    tut_pairs_s = statistics.median(tut_rates)
    log.info("(a) tutorial chain, CPU: %.1f pairs/s", tut_pairs_s)

    rows: list[dict] = []
    for pair in args.pairs.split(","):
        method_name, enc_name = pair.split(":")
        row: dict = {"method": method_name, "encoder": enc_name, "batch": args.batch}
        try:
            aug = BatchedSSLAugment.for_method(method_name, ROI, seed=0)

            def run_c(aug: BatchedSSLAugment = aug) -> int:
                it["i"] += 1
                start = (it["i"] * args.batch) % len(cached)
                aug([cached[(start + j) % len(cached)] for j in range(args.batch)])
                return args.batch

            rates = [_rate(run_c, args.seconds, sync) for _ in range(args.rounds)]
            row["aug_pairs_s"] = statistics.median(rates)
            row["aug_ms_per_batch"] = 1e3 * args.batch / row["aug_pairs_s"]
            row["x_tutorial"] = row["aug_pairs_s"] / tut_pairs_s
            kwargs = json.loads(args.encoder_kwargs).get(enc_name, {})
            torch.manual_seed(0)
            enc = build_encoder(enc_name, in_channels=1, img_size=ROI, **kwargs)
            method = build_method(method_name, enc).to(dev).train()
            batch = aug([cached[j % len(cached)] for j in range(args.batch)])  # the same batch for every step
            row["model_params_M"] = sum(p.numel() for p in method.parameters()) / 1e6
            for prec in ("fp32", "bf16") if dev.type == "cuda" else ("fp32",):
                ms = model_step_ms(method, batch, prec == "bf16", args.seconds, args.rounds, sync)
                row[f"model_ms_{prec}"] = statistics.median(ms)
            fastest = min(v for k, v in row.items() if k.startswith("model_ms_"))
            row["aug_over_model"] = row["aug_ms_per_batch"] / fastest
            row["aug_share"] = row["aug_ms_per_batch"] / (row["aug_ms_per_batch"] + fastest)
            row["starves_model"] = row["aug_ms_per_batch"] >= fastest
            row["status"] = "ok"
            del method, batch
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one failing pair is reported, the others still run
            log.exception("%s failed", pair)
            row["status"] = f"failed: {type(e).__name__}: {e}"[:500]
        log.info("%s", row)
        rows.append(row)

    ok = [r for r in rows if r["status"] == "ok"]
    goal_met = bool(ok) and all(r["x_tutorial"] >= GOAL_X for r in ok)
    never_starves = bool(ok) and not any(r["starves_model"] for r in ok)
    cmd = "python benchmarks/gpu_augment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine(dev)
    payload = {
        "dry_run": args.dry_run,
        "command": cmd,
        "machine": facts,
        "roi": list(ROI),
        "n_volumes": len(files),
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "tutorial_cpu_pairs_s": tut_pairs_s,
        "tutorial_cpu_pairs_s_rounds": tut_rates,
        "rows": rows,
        "goal_x": GOAL_X,
        "goal_met": goal_met,
        "never_starves": never_starves,
        "wall_s": time.perf_counter() - t_start,
    }
    where = facts["gpu"] or f"{dev.type} ({facts['cpu']})"
    md = [
        f"### Batched SSL augmentation on {where} (issue 12, GPU suite part 1)" + (" — DRY RUN" if args.dry_run else ""),
        "",
        f"`{cmd}`; torch {facts['torch']}, CUDA {facts['cuda']}, MONAI {facts['monai']}; views {ROI[0]}³, "
        f"{len(files)} hippocampus volumes, B = {args.batch}, median of {args.rounds} rounds × {args.seconds} s.",
        "",
        f"(a) MONAI tutorial chain on the CPU (one process, file reading included): **{tut_pairs_s:.1f} pairs/s**.",
        "",
        md_table(
            ["method + encoder", "(c) pairs/s", "× (a)", "aug ms/batch", "model ms/batch fp32",
             "model ms/batch bf16", "aug / model", "aug share of step", "starves model"],
            [[f"{r['method']} + {r['encoder']}", r.get("aug_pairs_s"), r.get("x_tutorial"),
              r.get("aug_ms_per_batch"), r.get("model_ms_fp32"), r.get("model_ms_bf16"),
              r.get("aug_over_model"), r.get("aug_share"),
              ("yes" if r["starves_model"] else "no") if r["status"] == "ok" else r["status"]]
             for r in rows],
        ),
        "",
        f"Goal ≥ {GOAL_X:g}× (a): {'met' if goal_met else 'NOT met'}; augmentation never slower than the model "
        f"step it feeds: {'met' if never_starves else 'NOT met'}.",
    ]
    write_part(args.out, PART, payload, "\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
