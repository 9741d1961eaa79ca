"""Peer: nnU-Net v2 on exactly the cases of a medssl finetuning run, at an equal budget (issue 12, item 2).

    python benchmarks/peer_nnunet.py --study-data studies/runs/sweeps/hippocampus-label-efficiency/data \\
        --fraction 10 --seed 0 --batch planner --minutes 20 --workdir ../studies/peer_nnunet

Stages (each resumable: a finished stage is skipped on a re-run; wall times in ``<run>/result.json``):

1. ``raw``: the nnU-Net raw dataset of medssl's cases for ``(fraction, seed)``
   (:func:`medssl.engines.finetune.data.finetune_items`): ``imagesTr``/``labelsTr`` = the seed's training
   fraction, ``imagesTs`` = the fixed test set; the seed's validation set is not used (nnU-Net trains fold
   ``all``, keeps ``checkpoint_final`` and selects nothing). Symlinks to the datalist's files.
2. ``plan``: ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (stock planner); ``--batch`` other than the plan's
   = a copy of the plans with only ``batch_size`` changed (a new plans identifier, nnU-Net's documented way).
3. ``probe`` (``--minutes``, or ``--match-medssl CONFIG``: the minutes medssl's run of the same fraction, seed and
   splits trains for on this machine, timed now by its dry run — equal compute wherever the comparison runs): the budget trainer (``_nnunet_budget_trainer.py``) runs ``--probe-warmup`` (3)
   + ``--probe-iterations`` (10) iterations with 0, 1 and 2 data-augmentation workers (``nnUNet_n_proc_DA``; or
   only ``--n-proc-da``); the fastest sets ``N = floor(minutes · 60 / s_per_it)``. ``--iterations N`` skips it.
4. ``train``: ``nnUNetv2_train <id> 3d_fullres all -tr nnUNetTrainerMedsslBudget -device <--device>`` with N
   iterations (``-device cpu``: torch threads = the machine's cores, set by nnU-Net).
5. ``predict``: ``nnUNetv2_predict`` on the test images (mirroring TTA on, as nnU-Net ships; ``--no-tta``).
6. ``evaluate``: medssl's :class:`~medssl.engines.finetune.metrics.SegmentationMetrics` on each label's native grid.

Writes ``<workdir>/<run>/result.json`` and prints a Markdown row for ``benchmarks/RESULTS.md``. nnU-Net runs
from its own venv (``make peer-venv``: ``.venv-nnunet``), never medssl's, or from a ``pip install --target DIR``
folder (``--nnunet-venv DIR``; the GPU machine, where DIR is on ``PYTHONPATH``: see :class:`NnUNet`).

``--device cuda`` (every probe, training and prediction call gets ``-device cuda``; ``_cuda`` ends the run folder's
name, so CPU and GPU results never share a folder; ``result.json`` records the device and the GPU's name).
nnU-Net's torch.compile stays off (``nnUNet_compile=f``) on both devices: compiling would eat minutes of a
minutes-long budget. On the 16-core GPU machine ``--n-proc-da 8`` is the sensible fixed number of augmentation
workers in place of the CPU probe's 0/1/2 (half the cores, the rest left to the main process and its pin-memory
thread; nnU-Net's own default there would be 12; not measured yet: no GPU probe has run). ``benchmarks/gpu_peer.sh``
runs the GPU comparison.

Peer: nnU-Net v2. nnunetv2 2.8.1 (pyproject extra ``peer``) with the stock ``ExperimentPlanner`` (3d_fullres),
the stock trainer cut to a fixed number of iterations and fold ``all``: what a user who picks nnU-Net instead of
medssl would run, on the same training cases, scored on the same test cases by the same metric code. Its
planner's batch depends on the case count (about 2 at 10 % and 7 at 100 % of hippocampus), so each fraction is
also worth running with ``--batch max-iter`` (batch 2: the most iterations in the budget); report both.
Choices recorded in ``result.json``: validation cases unused, ``checkpoint_final`` evaluated, mirroring TTA on,
per-epoch pseudo-Dice cut to one batch, final validation on the training cases skipped, the
``nnUNet_n_proc_DA`` the probe chose. One ``--minutes 20`` run costs about 30 min on 2 cores (planning 2–5 min
at 100 %, probe 1–4 min, training 20 min, prediction of 40 test cases with TTA a few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402
from _nnunet_budget_trainer import ENV_ITERATIONS, ENV_TIMING, TRAINER_NAME, budget_schedule  # noqa: E402
from _peer_nnunet_data import (  # noqa: E402
    channel_names,
    evaluate_predictions,
    iterations_for_minutes,
    nnunet_labels,
    plans_with_batch,
    probe_seconds_per_iteration,
    resolve_batch,
    run_cases,
    write_raw_dataset,
)

from medssl.data.splits import fraction_key  # noqa: E402
from medssl.errors import MedsslError  # noqa: E402

log = logging.getLogger("peer_nnunet")
REPO = Path(__file__).resolve().parents[1]
CONFIG = "3d_fullres"


class NnUNet:
    """nnU-Net's CLIs with ``nnUNet_raw`` / ``_preprocessed`` / ``_results`` under ``workdir``.

    ``venv`` is either a venv (``make peer-venv``: ``bin/python`` and the console scripts in ``bin``) or a
    ``pip install --target DIR`` folder (console scripts in ``DIR/bin``, no ``DIR/bin/python``), as on the GPU
    machine, where nnU-Net's wheels are installed into ``/tmp/site``. In the second case the console scripts and
    :meth:`python` run with this process's interpreter (``sys.executable``), and the caller must have ``DIR`` on
    ``PYTHONPATH`` (the child processes inherit it).

    Raises:
        MedsslError: no ``bin/nnUNetv2_train`` in ``venv``.
    """

    def __init__(self, venv: Path, workdir: Path) -> None:
        self.venv, self.workdir = venv, workdir
        if not (venv / "bin" / "nnUNetv2_train").exists():
            raise MedsslError(f"{venv}/bin/nnUNetv2_train not found: create nnU-Net's venv with `make peer-venv` "
                              "(or pass --nnunet-venv: a venv or a `pip install --target` folder)")
        own = venv / "bin" / "python"
        #: the interpreter of nnU-Net's processes: the venv's, else (a --target folder) this one
        self.interpreter = own if own.exists() else Path(sys.executable)
        self.target_install = not own.exists()

    def env(self, results: Path, **extra: str) -> dict[str, str]:
        env = dict(os.environ, nnUNet_raw=str(self.workdir / "nnUNet_raw"), nnUNet_results=str(results),
                   nnUNet_preprocessed=str(self.workdir / "nnUNet_preprocessed"), nnUNet_compile="f")
        return env | extra

    def command(self, tool: str, args: list[str]) -> list[str]:
        """The argument list running console script ``tool``: the script itself in a venv, ``[interpreter,
        script]`` in a ``--target`` folder (its shebang names the interpreter pip ran under, maybe another)."""
        script = str(self.venv / "bin" / tool)
        return [str(self.interpreter), script, *args] if self.target_install else [script, *args]

    def run(self, tool: str, args: list[str], env: dict[str, str], logfile: Path) -> float:
        """Run ``tool`` (a console script of the venv), output to ``logfile``; returns the wall time in s."""
        cmd = self.command(tool, args)
        log.info("$ %s  (log: %s)", shlex.join(cmd), logfile)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with logfile.open("a") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise MedsslError(f"{tool} failed with exit code {rc}; see {logfile}")
        return time.perf_counter() - t0

    def python(self, code: str) -> str:
        return subprocess.run([str(self.interpreter), "-c", code], check=True, capture_output=True,
                              text=True).stdout.strip()

    def install_trainer(self) -> Path:
        """Copy the budget trainer into nnU-Net's trainer folder (top level, see the trainer's docstring)."""
        pkg = Path(self.python("import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"))
        dst = pkg / "training" / "nnUNetTrainer" / f"{TRAINER_NAME}.py"
        src = Path(__file__).resolve().parent / "_nnunet_budget_trainer.py"
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
        return dst

    def versions(self, device: str = "cpu") -> dict[str, str]:
        """Versions of nnU-Net's interpreter (nnunetv2, torch, …, python); with ``device="cuda"`` also ``gpu``
        (torch's name of device 0) and ``cuda`` (torch's CUDA version)."""
        gpu = "{'gpu': torch.cuda.get_device_name(0), 'cuda': torch.version.cuda}" if device == "cuda" else "{}"
        code = ("import json, platform, torch; from importlib.metadata import version as v; print(json.dumps({p: v(p) "
                "for p in ('nnunetv2', 'torch', 'dynamic_network_architectures', 'batchgeneratorsv2')} | "
                f"{{'python': platform.python_version()}} | {gpu}))")
        return json.loads(self.python(code))


def _dataset_id(workdir: Path, key: str) -> int:
    """A stable nnU-Net dataset id per (fraction, seed) of this workdir (registry ``datasets.json``, from 500)."""
    workdir.mkdir(parents=True, exist_ok=True)
    reg_path = workdir / "datasets.json"
    reg = json.loads(reg_path.read_text()) if reg_path.exists() else {}
    if key not in reg:
        reg[key] = 500 + len(reg)
        reg_path.write_text(json.dumps(reg, indent=1) + "\n")
    return int(reg[key])


def _stage(state: dict[str, Any], name: str, path: Path, fn: Any) -> Any:
    """Run ``fn() -> (seconds, value)`` unless ``state`` records stage ``name`` done; save ``state``."""
    if name in state["stages"]:
        log.info("stage %s: done before (%.0f s), skipped", name, state["stages"][name]["seconds"])
        return state["stages"][name].get("value")
    seconds, value = fn()
    state["stages"][name] = {"seconds": round(seconds, 1), "value": value}
    path.write_text(json.dumps(state, indent=1) + "\n")
    return value


def _probe(nn: NnUNet, ds: str, plans: str, run_dir: Path, n_proc: list[int], warmup: int, iters: int,
           device: str = "cpu") -> dict:
    """Time ``warmup + iters`` training iterations on ``device`` per number of augmentation workers in ``n_proc``
    (a finished probe's ``timing.json`` is only read); the fastest gives ``n_proc_da`` and ``chosen_s_per_it`` (s)."""
    out: dict[str, Any] = {"warmup": warmup, "iterations": iters, "s_per_it": {}, "seconds": {}}
    for n in n_proc:
        d = run_dir / "probe" / f"da{n}"
        timing = d / "timing.json"
        if not timing.exists():
            env = nn.env(d / "results", **{ENV_ITERATIONS: str(warmup + iters), ENV_TIMING: str(timing),
                                            "nnUNet_n_proc_DA": str(n)})
            out["seconds"][str(n)] = round(nn.run("nnUNetv2_train", [ds, CONFIG, "all", "-tr", TRAINER_NAME, "-p",
                                                                     plans, "-device", device], env, d / "log.txt"), 1)
            shutil.rmtree(d / "results", ignore_errors=True)  # the probe's checkpoints are not needed
        spi = probe_seconds_per_iteration(json.loads(timing.read_text())["step_ends"], warmup)
        out["s_per_it"][str(n)] = round(spi, 4)
        log.info("probe: nnUNet_n_proc_DA=%d: %.3f s/it", n, spi)
    best = min(out["s_per_it"], key=out["s_per_it"].get)
    out["n_proc_da"], out["chosen_s_per_it"] = int(best), out["s_per_it"][best]
    return out


def matched_budget(config: Path, study_data: Path, fraction: float, seed: int, workdir: Path,
                   time_steps: int = 10) -> dict[str, Any]:
    """Equal compute on this machine (``--match-medssl``): the training seconds of medssl's finetuning run ``config``
    (its optimizer steps; validation excluded, as nnU-Net's budget excludes planning and prediction), timed now by
    its dry run (:func:`medssl.engines.finetune.estimate.estimate_run`). The first measurement of a (config, fraction,
    seed) is kept in ``<workdir>/matched_budgets.json`` and reused, so a re-run resumes the same run folder.

    Raises:
        MedsslError: the config is of another fraction or seed, or of other cases (its splits are not
            ``<study_data>/splits.json``), or its run is refused (an unfit recipe).
    """
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.estimate import estimate_run
    from medssl.engines.runtime.checkpoint import machine_tag

    cfg = FinetuneConfig.from_yaml(config)
    if float(cfg.fraction) != float(fraction) or int(cfg.seed) != int(seed):
        raise MedsslError(f"--match-medssl {config} is fraction {cfg.fraction:g} seed {cfg.seed}, the peer runs "
                          f"fraction {fraction:g} seed {seed}: equal compute needs the same run")
    if not cfg.splits or Path(cfg.splits).resolve() != (study_data / "splits.json").resolve():
        raise MedsslError(f"--match-medssl {config} uses splits {cfg.splits}, the peer {study_data / 'splits.json'}: "
                          "not the same cases")
    store = workdir / "matched_budgets.json"
    known = json.loads(store.read_text()) if store.exists() else {}
    key = f"{config.resolve()}:f{fraction_key(fraction)}:s{seed}"
    if key not in known:
        est = estimate_run(cfg, time_steps=time_steps)
        known[key] = {"config": str(config.resolve()), "medssl_steps": est.total_steps,
                      "medssl_s_per_step": round(est.timing["step"], 4), "training_s": round(est.timing["training"], 1),
                      "minutes": round(est.timing["training"] / 60.0, 2), "machine": machine_tag(est.machine),
                      "load_average": round(os.getloadavg()[0], 2)}
        workdir.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(known, indent=1))
        log.info("equal compute: medssl %s trains %d steps at %.3f s/step here = %.2f min", config,
                 est.total_steps, est.timing["step"], known[key]["minutes"])
    return known[key]


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    """All stages for one (fraction, seed, batch, budget); returns the result dict (also ``result.json``)."""
    work = args.workdir.resolve()
    nn = NnUNet(args.nnunet_venv.resolve(), work)
    load_start = os.getloadavg()[0]
    if load_start > (os.cpu_count() or 1) - 0.5:  # timings on a shared machine are several times slower
        log.warning("load average %.1f on %d cores: the probe and the budget measure a busy machine",
                    load_start, os.cpu_count())
    nn.install_trainer()
    fkey = fraction_key(args.fraction)
    cases = run_cases(args.study_data, args.fraction, args.seed)
    ds_id = _dataset_id(work, f"{args.study_data.resolve()}:f{fkey}_s{args.seed}")
    ds = f"Dataset{ds_id:03d}_medsslF{fkey.replace('.', 'p')}S{args.seed}"
    raw = work / "nnUNet_raw" / ds
    labels = nnunet_labels(args.study_data / "datalist.json", [c["label"] for c in cases["training"]])
    write_raw_dataset(raw, cases, labels=labels, channels=channel_names(cases["training"], args.study_data),
                      description=f"medssl fraction {fkey} % seed {args.seed} of {args.study_data}")
    pre = work / "nnUNet_preprocessed" / ds
    if not (pre / "nnUNetPlans.json").exists() or not any(pre.glob(f"nnUNetPlans_{CONFIG}")):
        secs = nn.run("nnUNetv2_plan_and_preprocess", ["-d", str(ds_id), "-c", CONFIG, "-np", "2",
                                                       "--verify_dataset_integrity"],
                      nn.env(work / "nnUNet_results"), work / "logs" / f"{ds}_plan.txt")
        (pre / "medssl_plan_seconds.json").write_text(json.dumps({"seconds": round(secs, 1)}))
    planner_batch = int(json.loads((pre / "nnUNetPlans.json").read_text())["configurations"][CONFIG]["batch_size"])
    matched = None
    if args.match_medssl is not None:  # equal compute: medssl's training minutes for this run, timed here
        matched = matched_budget(args.match_medssl, args.study_data, args.fraction, args.seed, work)
        args.minutes = matched["minutes"]
    batch = resolve_batch(args.batch, planner_batch)
    plans = plans_with_batch(pre, batch)
    budget = f"{args.minutes:g}min" if args.minutes else f"{args.iterations}it"
    on_gpu = "" if args.device == "cpu" else f"_{args.device}"  # CPU and GPU results never share a folder
    run_dir = work / f"f{fkey}_s{args.seed}_bs{batch}_{budget}{'' if args.tta else '_notta'}{on_gpu}"
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}

    def probe() -> tuple[float, Any]:
        t0 = time.perf_counter()
        n_proc = [args.n_proc_da] if args.n_proc_da is not None else [0, 1, 2]
        res = _probe(nn, ds, plans, run_dir, n_proc, args.probe_warmup, args.probe_iterations, args.device)
        return time.perf_counter() - t0, res

    probe_res = _stage(state, "probe", state_path, probe) if args.minutes else None
    total = iterations_for_minutes(args.minutes, probe_res["chosen_s_per_it"]) if args.minutes else args.iterations
    n_proc_da = probe_res["n_proc_da"] if probe_res else (args.n_proc_da if args.n_proc_da is not None else 0)
    results = run_dir / "nnUNet_results"
    timing = run_dir / "train_timing.json"

    def train() -> tuple[float, Any]:
        env = nn.env(results, **{ENV_ITERATIONS: str(total), ENV_TIMING: str(timing), "nnUNet_n_proc_DA": str(n_proc_da)})
        return nn.run("nnUNetv2_train", [ds, CONFIG, "all", "-tr", TRAINER_NAME, "-p", plans, "-device", args.device,
                                         "--c"], env, run_dir / "train_log.txt"), None

    _stage(state, "train", state_path, train)
    pred_dir = run_dir / "predictions"

    def predict() -> tuple[float, Any]:
        tta = [] if args.tta else ["--disable_tta"]
        return nn.run("nnUNetv2_predict", ["-i", str(raw / "imagesTs"), "-o", str(pred_dir), "-d", ds, "-c", CONFIG,
                                           "-f", "all", "-tr", TRAINER_NAME, "-p", plans, "-device", args.device,
                                           "-npp", "1", "-nps", "1", "--disable_progress_bar", *tta],
                      nn.env(results), run_dir / "predict_log.txt"), None

    _stage(state, "predict", state_path, predict)
    t0 = time.perf_counter()
    ev = evaluate_predictions(pred_dir, cases["test"], num_classes=len(labels))
    step_ends = json.loads(timing.read_text())["step_ends"] if timing.exists() else []
    epochs, per_epoch = budget_schedule(total)
    versions = nn.versions(args.device)
    result = {
        "fraction": args.fraction, "seed": args.seed, "batch": batch, "batch_spec": args.batch,
        "planner_batch": planner_batch, "plans": plans, "budget_minutes": args.minutes, "matched_medssl": matched,
        "iterations_budgeted": total, "iterations": epochs * per_epoch, "epochs": epochs,
        "iterations_per_epoch": per_epoch, "iterations_timed": len(step_ends),
        "seconds_train": state["stages"]["train"]["seconds"], "seconds_predict": state["stages"]["predict"]["seconds"],
        "seconds_evaluate": round(time.perf_counter() - t0, 1),
        "seconds_probe": state["stages"].get("probe", {}).get("seconds"), "probe": probe_res,
        "seconds_plan": json.loads((pre / "medssl_plan_seconds.json").read_text())["seconds"]
        if (pre / "medssl_plan_seconds.json").exists() else None,
        "n_proc_da": n_proc_da, "tta_mirroring": bool(args.tta), "fold": "all (validation set unused)",
        "cases": {r: len(v) for r, v in cases.items()}, "dataset": ds, "class_names": labels,
        "metrics": ev["metrics"], "per_case": ev["per_case"], "versions": versions, "device": args.device,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": versions.get("gpu"),
                    "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2)},
        "command": shlex.join(sys.argv),
        "stages": {k: v["seconds"] for k, v in state["stages"].items()},
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown_row(r: dict[str, Any]) -> str:
    """``| nnU-Net v2 … |`` row: fraction, seed, batch, iterations, train minutes, Dice per class and mean, HD95
    mean (mm), missed cases per class."""
    m = r["metrics"]
    k = sorted(int(key.split("_")[1]) for key in m if key.startswith("dice_") and key[5:].isdigit())
    dice = " / ".join(f"{m[f'dice_{c}']:.3f}" for c in k)
    missed = " / ".join(f"{int(m[f'missed_{c}'])}" for c in k)
    return (f"| nnU-Net v2 3d_fullres ({r['batch_spec']}) | {r['fraction']:g} % | {r['seed']} | {r['batch']} | "
            f"{r['iterations']} | {r['seconds_train'] / 60:.1f} | {m['dice_mean']:.4f} | {dice} | "
            f"{m['hd95_mean']:.2f} | {missed} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-data", type=Path, required=True, help="folder with datalist.json, splits.json")
    ap.add_argument("--fraction", type=float, required=True, help="label fraction in percent (a key of splits.json)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--batch", default="planner", help="planner | max-iter (batch 2) | an integer")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training budget; N from a timed probe")
    budget.add_argument("--iterations", type=int, help="training iterations N (no probe)")
    budget.add_argument("--match-medssl", type=Path, metavar="CONFIG",
                        help="equal compute on this machine: the training minutes of this medssl finetune config "
                             "(same fraction, seed and splits), timed now by its dry run; N from a timed probe")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--nnunet-venv", type=Path, default=REPO / ".venv-nnunet",
                    help="nnU-Net's venv, or a `pip install --target` folder on PYTHONPATH (bin/nnUNetv2_train)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="-device of every nnUNetv2_train / nnUNetv2_predict call")
    ap.add_argument("--n-proc-da", type=int, help="nnUNet_n_proc_DA (default: the probe's fastest of 0, 1, 2; "
                                                  "8 on the 16-core GPU machine)")
    ap.add_argument("--probe-warmup", type=int, default=3, help="untimed probe iterations first")
    ap.add_argument("--probe-iterations", type=int, default=10, help="timed probe iterations")
    ap.add_argument("--no-tta", dest="tta", action="store_false", help="predict without mirroring TTA")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    try:
        result = run_peer(args)
    except MedsslError as e:
        if args.verbose:
            raise
        log.error("peer_nnunet: %s", e)
        return 1
    print("| arm | fraction | seed | batch | iterations | train min | Dice mean | Dice per class | HD95 mean (mm) | "
          "missed per class |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(markdown_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
