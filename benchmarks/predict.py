"""`medssl predict` speed: torch eager vs TorchScript vs ONNX Runtime, and predict vs a hand-written MONAI loop.

On the same real hippocampus volumes (the last ``--n`` of ``imagesTr``, with their labels), one model (finetuned
here for ``--steps`` steps on the *first* cases into a temp dir, or ``--model``), measured side by side in one
process, in interleaved rounds (each round runs every mode once, the order rotated), median seconds per volume:

- ``predict[torch|torchscript|onnx]``: :func:`medssl.deploy.predict.predict` on the folder of volumes, the
  model (or its export, ``medssl export``) loaded once before the timed calls; background reading/writing on.
- ``predict[torch] sequential``: the same with ``prefetch=False`` (what the overlap of I/O with compute buys).
- ``plain loop``: what a user writes by hand after the MONAI tutorials (spleen_segmentation_3d, "inference on
  the test set"), with the same loaded torch network and the same preprocessing, for each file::

      d = pre({"image": path})                 # LoadImaged → EnsureChannelFirstd → Orientationd → (Spacingd)
                                               # → normalisation → EnsureTyped: preprocess_transforms(recipe)
      d["pred"] = sliding_window_inference(d["image"][None], roi, sw_batch, net, overlap, mode="gaussian")[0]
      post(d)                                  # Invertd(pred) → AsDiscreted(argmax) → SaveImaged(uint8)

Per mode: s/volume (whole call / volumes) and inference s/volume (predict's ``infer_s``: sliding window +
inversion), peak RSS during the calls (``/proc/self/statm`` sampled every 5 ms; ``--device cuda``: torch's
``max_memory_allocated`` too, which does not see ONNX Runtime's CUDA arena), mean Dice against the labels (the
backends must agree) and the stages of the time (read + preprocess, inference, write). Goals (issue 10): the
fastest backend ≥ 1.5× eager at identical Dice; predict on a folder ≥ 2× the plain loop.

Prints the CPU, threads and load average, and a Markdown block for ``benchmarks/RESULTS.md``; writes
``predict_bench.json`` and ``predict_bench.md`` into ``--out``. On a busy shared 2-core machine run with
``OMP_NUM_THREADS=1`` (relative numbers only)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict.py --n 24 --rounds 3 --out benchmarks/out/predict
    .venv/bin/python benchmarks/predict.py --model runs/ft --device cuda --n 40       # an existing finetune run
    .venv/bin/python benchmarks/predict.py --quick --out /tmp/p                       # 2 volumes, dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus"
FALLBACK_DATA = REPO / "examples" / "data" / "hippocampus"
MODES = ("predict[torch]", "predict[torchscript]", "predict[onnx]", "predict[torch] sequential", "plain loop")

log = logging.getLogger("bench_predict")


@contextmanager
def peak_rss(interval_s: float = 0.005) -> Iterator[dict[str, float]]:
    """Peak resident memory (MiB) of this process while the block runs, sampled from ``/proc/self/statm``."""
    page = os.sysconf("SC_PAGE_SIZE")
    box = {"peak_mib": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                box["peak_mib"] = max(box["peak_mib"], int(f.read().split()[1]) * page / 2**20)
            if stop.wait(interval_s):
                return

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield box
    finally:
        stop.set()
        t.join()


def finetune(data: Path, cases: Sequence[Path], out: Path, steps: int, quick: bool) -> Path:
    """A SegResNet finetuned on ``cases`` (the demo's recipe: 8 filters, 32³ ROI; ``quick``: the deploy tests'
    tiny 4-filter net on 16³); returns the run folder."""
    from medssl.data.splits import split_datalist
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.engine import Finetuner

    labels = json.loads((data / "dataset.json").read_text()).get("labels") if (data / "dataset.json").is_file() else None
    items = [{"image": str(p), "label": str(data / "labelsTr" / p.name), "case_id": p.name.split(".")[0]}
             for p in cases]
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").write_text(json.dumps({"training": items, "labels": labels}))
    splits, _ = split_datalist(out / "datalist.json", fractions=[100], seeds=[0], test_fraction=0.2, val_fraction=0.2)
    net = ({"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}
           if quick else {"init_filters": 8})
    cfg = FinetuneConfig(datalist=str(out / "datalist.json"), splits=str(splits), network="SegResNet",
                         network_kwargs=net, out_channels=3, roi_size=[16, 16, 16] if quick else [32, 32, 32],
                         batch_size=2, num_samples=2, max_steps=steps, warmup_steps=max(1, steps // 10),
                         val_every_steps=max(1, steps // 4), lr=1e-3 if not quick else 1e-2, sw_batch_size=4,
                         device="cpu", out_dir=str(out / "run"), experiment=None,
                         augment={"flip_prob": 0.5, "flip_axes": [0]})
    t0 = time.perf_counter()
    Finetuner(cfg).fit(progress=False)
    log.info("finetuned %d steps in %.0f s", steps, time.perf_counter() - t0)
    return out / "run"


def plain_loop(network: Any, prep: dict[str, Any], images: Sequence[Path], out: Path, device: str) -> dict[str, float]:
    """The hand-written MONAI loop (module docstring); returns its stage seconds (sums over the files)."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged

    from medssl.transforms.preprocess import preprocess_transforms

    pre = preprocess_transforms(prep)
    post_invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    post_save = Compose([AsDiscreted("pred", argmax=True),
                         SaveImaged("pred", output_dir=str(out), output_postfix="seg", separate_folder=False,
                                    output_dtype=np.uint8, resample=False, print_log=False)])
    stages = {"read_s": 0.0, "window_s": 0.0, "invert_s": 0.0, "write_s": 0.0}
    for path in images:
        t0 = time.perf_counter()
        d = pre({"image": str(path)})
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_inference(d["image"][None].to(device), prep["roi_size"], prep["sw_batch_size"],
                                              network, overlap=prep["sw_overlap"], mode="gaussian")
        d["pred"] = logits[0].cpu()
        t2 = time.perf_counter()
        d = post_invert(d)
        t3 = time.perf_counter()
        post_save(d)
        t4 = time.perf_counter()
        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[k] += dt
    stages["infer_s"] = stages["window_s"] + stages["invert_s"]  # predict's infer_s: windows + inversion
    return stages


def mean_dice(out: Path, images: Sequence[Path], labels_dir: Path, suffix: str = "_seg") -> tuple[float, list[float]]:
    """Mean foreground Dice of ``<out>/<case><suffix>.nii.gz`` against the labels (and per case)."""
    from medssl.deploy.score import score_files

    per = [score_files(out / f"{p.name[:-7]}{suffix}.nii.gz", labels_dir / p.name, 3)["dice_mean"] for p in images]
    return statistics.fmean(per), per


def label_agreement(a: Path, b: Path, images: Sequence[Path]) -> float:
    """Fraction of voxels whose labels agree between two output folders (all volumes together)."""
    import nibabel as nib
    import numpy as np

    same = total = 0
    for p in images:
        x, y = (np.asarray(nib.load(d / f"{p.name[:-7]}_seg.nii.gz").dataobj) for d in (a, b))
        same, total = same + int((x == y).sum()), total + x.size
    return same / total


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Finetune (unless ``--model``), export, then time every mode in interleaved rounds (module docstring)."""
    data = args.data if (args.data / "imagesTr").is_dir() else FALLBACK_DATA
    all_images = sorted(p for p in (data / "imagesTr").glob("*.nii.gz") if (data / "labelsTr" / p.name).is_file())
    if len(all_images) < args.n + 6:
        raise SystemExit(f"{data}: {len(all_images)} labelled volumes, need --n {args.n} + 6 for finetuning")
    images = all_images[-args.n:]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medssl_bench_predict_") as tmp:
        return _run(args, data, all_images, images, load_start, Path(tmp))


def _run(args: argparse.Namespace, data: Path, all_images: list[Path], images: list[Path],
         load_start: tuple[float, float, float], tmp: Path) -> dict[str, Any]:
    import torch

    from benchmarks._machine import cpu_model
    from medssl.deploy.export import export_model, load_exported
    from medssl.deploy.model import load_model
    from medssl.deploy.predict import predict
    from medssl.errors import MedsslError

    model_src = args.model or finetune(data, all_images[: min(20, len(all_images) - args.n)], tmp / "ft",
                                       args.steps, args.quick)
    t0 = time.perf_counter()
    try:
        export_model(model_src, tmp / "export", volume=images[0])
    except MedsslError as e:  # a failed parity check still leaves the files; the labels are compared below
        if not all((tmp / "export" / f).is_file() for f in ("model.ts", "model.onnx")):
            raise
        log.warning("%s: benchmarking the exported files anyway", e)
    export_s = time.perf_counter() - t0
    export_check = {f: {k: c[k] for k in ("max_abs_diff", "argmax_agreement", "passed")} for f, c in
                    json.loads((tmp / "export" / "export_check.json").read_text())["checks"].items()}
    dev = args.device
    loaded = {"torch": load_model(model_src, device=dev),
              "torchscript": load_exported(tmp / "export", backend="torchscript", device=dev),
              "onnx": load_exported(tmp / "export", backend="onnx", device=dev)}
    net, prep = loaded["torch"].network, loaded["torch"].preprocessing
    inputs = tmp / "inputs"  # one folder of the volumes (symlinks): predict on a folder
    inputs.mkdir()
    for p in images:
        (inputs / p.name).symlink_to(p.resolve())

    def call(mode: str, out: Path) -> dict[str, float]:
        if mode == "plain loop":
            return plain_loop(net, prep, images, out, dev)
        backend = mode.split("[")[1].split("]")[0]
        res = predict(loaded[backend], [inputs], out, backend=backend, device=dev,
                      prefetch=not mode.endswith("sequential"))
        if res.exit_code or len(res.ok) != len(images):
            raise SystemExit(f"{mode}: predict failed: {res.failed}")
        return json.loads(res.report_path.read_text())["stages"]

    modes = [m for m in MODES if args.quick or m in args.modes]
    call(modes[0], tmp / "warmup")  # imports, allocator, first-call JIT work
    times: dict[str, list[float]] = {m: [] for m in modes}
    stages: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    rss: dict[str, float] = {m: 0.0 for m in modes}
    gpu: dict[str, float] = {}
    for r in range(args.rounds):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            out = tmp / f"r{r}" / m.replace(" ", "_").replace("[", "_").replace("]", "")
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with peak_rss() as mem:
                t = time.perf_counter()
                stages[m].append(call(m, out))
                times[m].append((time.perf_counter() - t) / len(images))
            rss[m] = max(rss[m], mem["peak_mib"])
            if dev.startswith("cuda"):
                gpu[m] = max(gpu.get(m, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            log.info("round %d %-26s %.3f s/volume", r, m, times[m][-1])
    last = {m: tmp / f"r{args.rounds - 1}" / m.replace(" ", "_").replace("[", "_").replace("]", "") for m in modes}
    rows = {}
    for m in modes:
        dice, _ = mean_dice(last[m], images, data / "labelsTr")
        st = {k: statistics.median(s[k] for s in stages[m]) / len(images) for k in stages[m][0]}
        rows[m] = {"s_per_volume": statistics.median(times[m]), "all_s_per_volume": times[m], "dice_mean": dice,
                   "agreement_with_torch": label_agreement(last[modes[0]], last[m], images),
                   "peak_rss_mib": rss[m], "stages_s_per_volume": st} | (
                   {"gpu_max_allocated_mib": gpu[m]} if m in gpu else {})
    backends = [m for m in modes if m.startswith("predict[") and not m.endswith("sequential")]
    fastest = min(backends, key=lambda m: rows[m]["stages_s_per_volume"]["infer_s"])
    eager = rows["predict[torch]"]
    goals = {
        "fastest_backend": fastest,
        "backend_speedup": eager["stages_s_per_volume"]["infer_s"] / rows[fastest]["stages_s_per_volume"]["infer_s"],
        "backend_dice_spread": max(rows[m]["dice_mean"] for m in backends) - min(rows[m]["dice_mean"] for m in backends),
    }
    if "plain loop" in rows:
        goals["predict_vs_plain_loop"] = rows["plain loop"]["s_per_volume"] / eager["s_per_volume"]
    if "predict[torch] sequential" in rows:
        goals["overlap_speedup"] = rows["predict[torch] sequential"]["s_per_volume"] / eager["s_per_volume"]
    goals["backend_goal_met"] = bool(goals["backend_speedup"] >= 1.5 and goals["backend_dice_spread"] <= 1e-3)
    goals["plain_loop_goal_met"] = bool(goals.get("predict_vs_plain_loop", 0.0) >= 2.0)
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "device": dev, "load_average_start": [round(v, 2) for v in load_start],
                    "load_average_end": [round(v, 2) for v in os.getloadavg()],
                    "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "data": str(data), "volumes": [p.name for p in images], "rounds": args.rounds,
        "model": str(model_src), "steps": None if args.model else args.steps, "export_s": round(export_s, 1),
        "export_check": export_check,
        "preprocessing": prep, "modes": rows, "goals": goals, "command": args.command,
    }


def markdown(res: dict[str, Any]) -> str:
    """The Markdown block for ``benchmarks/RESULTS.md``."""
    m, g = res["machine"], res["goals"]
    lines = [
        "### `medssl predict` speed (issue 10)",
        "",
        f"{len(res['volumes'])} real hippocampus volumes, {res['rounds']} interleaved rounds, medians; {m['cpu']}, "
        f"{m['cores']} cores, device {m['device']}, torch threads {m['torch_threads']}, load average "
        f"{m['load_average_start'][0]} → {m['load_average_end'][0]}; model: SegResNet "
        f"(roi {res['preprocessing']['roi_size']}, sw batch {res['preprocessing']['sw_batch_size']}, overlap "
        f"{res['preprocessing']['sw_overlap']}), {res['steps'] or 'given'} finetuning steps.",
        "",
    ]
    gpu_col = any("gpu_max_allocated_mib" in r for r in res["modes"].values())
    cols = ["mode", "s / volume", "inference s / volume", "read", "write", "Dice (mean)", "labels = torch",
            "peak RSS MiB"] + (["GPU MiB"] if gpu_col else [])
    lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, r in res["modes"].items():
        st = r["stages_s_per_volume"]
        cells = [name, f"{r['s_per_volume']:.3f}", f"{st['infer_s']:.3f}", f"{st['read_s']:.3f}", f"{st['write_s']:.3f}",
                 f"{r['dice_mean']:.4f}", f"{100 * r['agreement_with_torch']:.3f} %", f"{r['peak_rss_mib']:.0f}"]
        if gpu_col:
            cells.append(f"{r['gpu_max_allocated_mib']:.0f}" if "gpu_max_allocated_mib" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Fastest backend: {g['fastest_backend']}, {g['backend_speedup']:.2f}× eager inference (goal ≥ 1.5×: "
              f"{'met' if g['backend_goal_met'] else 'missed'}), Dice spread {g['backend_dice_spread']:.2g}."]
    if "predict_vs_plain_loop" in g:
        lines.append(f"predict on a folder: {g['predict_vs_plain_loop']:.2f}× the plain MONAI loop (goal ≥ 2×: "
                     f"{'met' if g['plain_loop_goal_met'] else 'missed'}); background I/O alone: "
                     f"{g.get('overlap_speedup', float('nan')):.2f}× the same predict sequential.")
    lines.append("Export parity check (medssl export, max |logit diff| ≤ 1e-4, argmax ≥ 99.99 %): " + "; ".join(
        f"{f} {'passed' if c['passed'] else 'FAILED'} ({c['max_abs_diff']:.2g}, {100 * c['argmax_agreement']:.3f} %)"
        for f, c in res["export_check"].items()) + ".")
    if "plain loop" in res["modes"]:
        st = res["modes"]["plain loop"]["stages_s_per_volume"]
        total = sum(st[k] for k in ("read_s", "window_s", "invert_s", "write_s"))
        lines.append("Profile of a volume (plain loop, in sequence): " + ", ".join(
            f"{name} {st[k]:.3f} s ({100 * st[k] / total:.0f} %)" for name, k in (
                ("read + preprocess", "read_s"), ("sliding-window inference", "window_s"), ("inverse", "invert_s"),
                ("write", "write_s"))) + ": background I/O can save at most the non-inference share.")
    lines += ["", f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="finetune checkpoint / run folder / MLflow URI (default: finetune)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD folder with imagesTr/ + labelsTr/")
    ap.add_argument("--n", type=int, default=24, help="volumes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="finetuning steps when no --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "predict")
    ap.add_argument("--quick", action="store_true", help="dry run: 2 volumes, 1 round, a 2-step tiny model")
    args = ap.parse_args(argv)
    args.command = shlex.join(["benchmarks/predict.py", *(sys.argv[1:] if argv is None else argv)])
    args.modes = [m.strip() for m in args.modes.split(",")]
    if "predict[torch]" not in args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes must include predict[torch] and be among {MODES}")
    if args.quick:
        args.n, args.rounds, args.steps = 2, 1, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("medssl", "monai", "mlflow", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict_bench.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (args.out / "predict_bench.md").write_text(md)
    print(md)
    if max(res["machine"]["load_average_start"][0], res["machine"]["load_average_end"][0]) > 0.5 * (os.cpu_count() or 1):
        log.warning("busy machine (load average above half the cores): ratios only; re-run on a quiet machine")
    return res


if __name__ == "__main__":
    main()
