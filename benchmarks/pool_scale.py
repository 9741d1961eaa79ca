"""Pretraining at pool scale: steps/s and peak RSS per DDP rank for pools of 100, 1,000 and 10,000 volumes.

Generates N seeded synthetic float32 NIfTI volumes (32³–48³ voxels, blobs + noise, ``--sizes`` pools are
prefixes of one generated set) and, per pool size, launches ``torchrun --nproc-per-node 2`` (Gloo, CPU, one
thread per rank) on this file's ``--worker`` mode. Each rank runs the real pretraining engine
(:class:`medssl.engines.pretrain.engine.Pretrainer`, ``medssl pretrain``'s set-up) with the persistent disk cache
(``cache="disk"``, one cache folder shared by every size and rank) and the rank-sharded pool
(``data_shard="pool"``), and measures:

- ``build_s``: filling its shard of the disk cache (entries made by an earlier size are hits);
- ``steps_per_s``: median over ``--steps`` optimizer steps after ``--warm`` warm-up steps;
- ``data_share``: the share of a step spent fetching the batch from the cache (``CropBatcher.next_batch``):
  the most a prefetching DataLoader worker could hide behind compute, i.e. the measurement deciding
  whether workers are worth adding;
- ``peak_rss_mib`` (``ru_maxrss``) and ``rss_mib`` (``VmRSS`` after the steps).

Goals (issue 11): peak RSS per rank flat in the pool size (largest / smallest ≤ 1.10) and steps/s of
every size within 10 % of the smallest size's. Prints a Markdown block for ``benchmarks/RESULTS.md``
(machine, load average, command) and writes ``pool_scale.json`` + ``pool_scale.md`` to ``--out``.

Usage::

    .venv/bin/python benchmarks/pool_scale.py                    # 100, 1,000, 10,000 (see RESULTS.md)
    .venv/bin/python benchmarks/pool_scale.py --sizes 100 1000
    .venv/bin/python benchmarks/pool_scale.py --quick            # CI dry run: 20 and 60 volumes, few steps
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (torchrun runs this file directly)
    sys.path.insert(0, str(REPO))

from benchmarks._machine import cpu_model  # noqa: E402

__all__ = ["generate_volumes", "main"]

log = logging.getLogger("medssl.bench.pool_scale")


def generate_volumes(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` float32 NIfTI volumes (32–48 voxels per side, 1.5 mm, Gaussian blobs + noise; uncompressed ``.nii``) and a datalist
    of them; existing volumes (a previous, larger or equal run) are kept.

    Returns:
        The ``datalist.json`` listing ``vol00000.nii`` … (section ``unlabeled``).
    """
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        name = f"vol{i:05d}.nii"  # uncompressed: gzip of noisy floats took most of the generation time
        items.append({"image": name, "case_id": f"case{i:05d}"})
        if (folder / name).exists():
            continue
        rng = np.random.default_rng([seed, i])
        shape = tuple(int(s) for s in rng.integers(32, 49, size=3))
        axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
        img = rng.normal(0, 0.1, shape).astype(np.float32)
        for _ in range(3):  # separable Gaussian blobs: outer product of 1-D profiles
            c, w = rng.uniform(-0.6, 0.6, 3), rng.uniform(0.1, 0.4)
            g = [np.exp(-((a - ci) ** 2) / (2 * w * w)) for a, ci in zip(axes, c, strict=True)]
            img += np.float32(rng.uniform(0.5, 2.0)) * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        tmp = folder / f".{name}"
        nib.save(nib.Nifti1Image((img * 500).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), tmp)
        os.replace(tmp, folder / name)
    path = folder / f"datalist_{n}.json"
    path.write_text(json.dumps({"training": [], "unlabeled": items}))
    return path


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(config_path: Path, result_dir: Path, warm: int, steps: int) -> None:
    """One rank under torchrun: the engine's set-up, fill this rank's shard of the disk cache, warm up,
    time ``steps`` optimizer steps, write ``rank<R>.json``."""
    import faulthandler

    import numpy as np
    import torch

    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.components import build_components
    from medssl.engines.pretrain.engine import Pretrainer
    from medssl.engines.pretrain.pool import load_pool, resolve_in_channels
    from medssl.engines.runtime import distributed as dd
    from medssl.engines.runtime.checkpoint import seed_all

    faulthandler.dump_traceback_later(900, exit=True)  # a hung rank prints where, then exits
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: print the stacks
    cfg = PretrainConfig.from_yaml(config_path)
    torch.set_num_threads(1)
    info, created = dd.init_distributed(cfg.device)
    try:
        pool = load_pool(cfg.datalist, cfg.sections)
        cfg = resolve_in_channels(cfg, pool)
        seed_all(cfg.seed)
        encoder, method, augment = build_components(cfg, rank=info.rank, world_size=info.world_size)
        seed_all(cfg.seed + info.rank)
        trainer = Pretrainer(cfg, encoder, method, augment, pool)
        shard = sorted(set(int(i) for i in trainer.batcher.indices))
        cache = Path(cfg.cache_dir)
        dd.barrier()
        before = sum(1 for _ in cache.rglob("*.pt"))
        dd.barrier()
        t0 = time.perf_counter()
        for i in shard:  # fill this rank's part of the disk cache (hits where an earlier run made it)
            trainer.dataset[i]
        build_s = time.perf_counter() - t0
        dd.barrier()
        made = sum(1 for _ in cache.rglob("*.pt")) - before  # by every rank of this run
        fetch = trainer.batcher.next_batch
        data_s: list[float] = []

        def timed(b: int) -> list[torch.Tensor]:
            t = time.perf_counter()
            out = fetch(b)
            data_s.append(time.perf_counter() - t)
            return out

        trainer.batcher.next_batch = timed  # type: ignore[method-assign]
        trainer.method.train()
        for _ in range(warm):
            trainer.train_step()
        data_s.clear()
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            trainer.train_step()
            step_s.append(time.perf_counter() - t)
        res = {
            "rank": info.rank, "world_size": info.world_size, "pool": len(pool), "shard": len(shard),
            "build_s": build_s, "cache_entries_made": made,
            "steps": steps, "step_s": step_s, "steps_per_s": 1.0 / statistics.median(step_s),
            "data_share": float(np.sum(data_s) / np.sum(step_s)),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mib": _rss_mib(),
        }  # fmt: skip
        (result_dir / f"rank{info.rank}.json").write_text(json.dumps(res))
        dd.barrier()  # as the engine's _finish: no rank leaves the group while another is mid-collective
        # the DDP reducer must go before its Gloo group: freed after destroy_process_group, one rank hung
        del trainer, method, encoder, augment
        gc.collect()
    finally:
        if created:
            dd.cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_size(args: argparse.Namespace, datalist: Path, n: int, out: Path) -> list[dict[str, Any]]:
    from medssl.config import PretrainConfig

    run = out / f"pool_{n}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(
        datalist=str(datalist), sections=["unlabeled"], method=args.method, encoder=args.encoder,
        encoder_kwargs=json.loads(args.encoder_kwargs), roi_size=[args.roi] * 3, batch_size=args.batch_size,
        total_steps=10**6, warmup_steps=0, device="cpu", out_dir=str(run / "train"), experiment=None,
        preview=False, cache="disk", cache_dir=str(out / "cache"), data_shard="pool", num_threads=1,
    )  # fmt: skip
    cfg.to_yaml(run / "config.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker",
           str(run / "config.yaml"), "--result-dir", str(run), "--warm", str(args.warm), "--steps",
           str(args.steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(run / "torchrun.log", "w") as fh:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout)
    if done.returncode != 0:
        text = (run / "torchrun.log").read_text()[-3000:]
        raise RuntimeError(f"pool {n}: torchrun failed ({done.returncode}), {run / 'torchrun.log'}:\n{text}")
    rows = [json.loads((run / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    for r in rows:
        r["wall_s"] = time.perf_counter() - t0
    log.info("pool %d: %s", n, [(r["rank"], round(r["steps_per_s"], 2), round(r["peak_rss_mib"])) for r in rows])
    return rows


def _markdown(res: dict[str, Any]) -> str:
    m, g = res["machine"], res["goals"]
    lines = [
        "### Pretraining pool scale (disk cache, rank-sharded pool, 2 Gloo ranks)",
        "",
        f"`{res['command']}` — {m['cpu']}, {m['cores']} cores, load average {m['load_average_start']} → "
        f"{m['load_average_end']}, torch {m['torch']}, MONAI {m['monai']}; {res['model']}, B={res['batch_size']} "
        f"per rank, {res['steps']} timed steps after {res['warm']} warm-up.",
        "",
        "| pool | volumes / rank | cache fill s (rank max) | steps/s (rank min) | vs smallest | data share of a step "
        "| peak RSS MiB / rank (max) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, rows in res["sizes"].items():
        sps = min(r["steps_per_s"] for r in rows)
        lines.append(
            f"| {int(n):,} | {rows[0]['shard']:,} | {max(r['build_s'] for r in rows):.1f} | {sps:.2f} | "
            f"{sps / g['base_steps_per_s']:.2f} | {max(r['data_share'] for r in rows):.1%} | "
            f"{max(r['peak_rss_mib'] for r in rows):.0f} |"
        )
    lines += [
        "",
        f"Goals: peak RSS largest/smallest pool {g['rss_ratio']:.3f} (≤ 1.10: {'met' if g['rss_flat'] else 'NOT met'}); "
        f"slowest steps/s vs smallest pool {g['throughput_ratio']:.3f} (≥ 0.90: "
        f"{'met' if g['throughput_ok'] else 'NOT met'}). Prefetching workers could hide at most the data share "
        f"({g['max_data_share']:.1%} of a step): {g['prefetch']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate, run every pool size, print and write the results (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--quick", action="store_true", help="CI dry run: sizes 20 60, 2 warm-up + 4 timed steps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--method", default="simclr")
    p.add_argument("--encoder", default="segresnet")
    p.add_argument("--encoder-kwargs", default='{"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}')
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pool size before giving up")
    p.add_argument("--data", type=Path, default=None, help="volume folder (default: a temp dir), reused")
    p.add_argument("--out", type=Path, default=None, help="results + disk cache (default: a temp dir)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.result_dir, args.warm, args.steps)
        return {}
    if args.quick:
        args.sizes, args.steps, args.warm, args.roi = [20, 60], 4, 2, 16
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import monai
    import torch

    out = args.out or Path(tempfile.mkdtemp(prefix="pool_scale_"))
    data = args.data or out / "volumes"
    out.mkdir(parents=True, exist_ok=True)
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    generate_volumes(data, max(args.sizes))
    gen_s = time.perf_counter() - t0
    sizes = {}
    for n in sorted(args.sizes):
        sizes[str(n)] = _run_size(args, generate_volumes(data, n), n, out)
    base = min(r["steps_per_s"] for r in sizes[str(min(args.sizes))])
    peak = {n: max(r["peak_rss_mib"] for r in rows) for n, rows in sizes.items()}
    slowest = min(min(r["steps_per_s"] for r in rows) for rows in sizes.values())
    share = max(r["data_share"] for rows in sizes.values() for r in rows)
    goals = {
        "base_steps_per_s": base,
        "rss_ratio": peak[str(max(args.sizes))] / peak[str(min(args.sizes))],
        "throughput_ratio": slowest / base,
        "max_data_share": share,
    }
    goals["rss_flat"] = goals["rss_ratio"] <= 1.10
    goals["throughput_ok"] = goals["throughput_ratio"] >= 0.90
    goals["prefetch"] = ("not worth a worker process (the engine keeps num_workers=0)" if share < 0.10
                         else "worth measuring a prefetching DataLoader worker")  # fmt: skip
    res = {
        "command": "python benchmarks/pool_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": f"{args.method} + {args.encoder} {args.encoder_kwargs}, roi {args.roi}³",
        "batch_size": args.batch_size, "steps": args.steps, "warm": args.warm, "generate_s": gen_s,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load0, "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "torch": torch.__version__, "monai": monai.__version__},
        "sizes": sizes, "goals": goals,
    }  # fmt: skip
    (out / "pool_scale.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (out / "pool_scale.md").write_text(md)
    print(md)  # noqa: T201 - the Markdown block for RESULTS.md is this script's output
    return res


if __name__ == "__main__":
    main()
