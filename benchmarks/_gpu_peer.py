"""Helpers of ``benchmarks/gpu_peer.sh`` (issue 12 item 2's equal-GPU-minutes comparison of medssl's recipe with
nnU-Net v2): stage one run's cases for the GPU machine, point a study's datalist at the carried dataset, size
medssl's step budget from a measured step time, and write the side-by-side report. Runs in medssl's environment;
the nnU-Net side is ``benchmarks/peer_nnunet.py``.

    python benchmarks/_gpu_peer.py stage --study-data S --fraction 10 --seed 0 --dst .gpu/peer
    python benchmarks/_gpu_peer.py relocate --study-data S --dataset DIR --dst W/study
    python benchmarks/_gpu_peer.py medssl-config --pipeline P --timing T --minutes 3 --dst W/cfg.yaml
    python benchmarks/_gpu_peer.py report --work W --out O --minutes 3 [--dry-run]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer_nnunet_data import run_cases  # noqa: E402

from medssl.engines.finetune.data import planning_items  # noqa: E402
from medssl.errors import MedsslError  # noqa: E402

__all__ = ["relocate_datalist", "stage_run_data", "medssl_steps_for_minutes", "gpu_peer_report"]

log = logging.getLogger(__name__)


_STUDY_FILES = ("datalist.json", "splits.json", "manifest.csv")


def _moved(path: str | list[str], dataset: Path) -> str | list[str]:
    """``…/<anything>/imagesTr/x.nii.gz`` → ``dataset/imagesTr/x.nii.gz`` (each channel of a list)."""
    if isinstance(path, (list, tuple)):
        return [str(_moved(p, dataset)) for p in path]
    return str(dataset / Path(path).parent.name / Path(path).name)


def relocate_datalist(study_data: str | Path, dst: str | Path, dataset: str | Path) -> Path:
    """Copy a study's ``datalist.json`` into ``dst`` with every ``image`` / ``label`` path moved into ``dataset``
    (its folder and file name kept: ``../../../../../../shared/datasets/msd_task04_hippocampus/imagesTr/h_107.nii.gz``
    → ``<dataset>/imagesTr/h_107.nii.gz``, absolute), and ``splits.json`` / ``manifest.csv`` unchanged.

    A study's datalist holds paths relative to its folder that reach ``../shared``, which does not travel to the GPU
    machine; the carried copy of the dataset lies elsewhere there.

    Returns:
        ``dst`` (``dst/datalist.json`` + ``dst/splits.json``: a ``--study-data`` folder).

    Raises:
        MedsslError: no ``datalist.json`` or ``splits.json`` in ``study_data``.
    """
    src, dst, dataset = Path(study_data), Path(dst), Path(dataset).resolve()
    for name in _STUDY_FILES[:2]:
        if not (src / name).is_file():
            raise MedsslError(f"{src / name} not found: --study-data needs datalist.json and splits.json")
    data = json.loads((src / "datalist.json").read_text())
    for entries in data.values():
        for it in entries if isinstance(entries, list) else []:
            for key in ("image", "label"):
                if isinstance(it, dict) and isinstance(it.get(key), (str, list)):
                    it[key] = _moved(it[key], dataset)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "datalist.json").write_text(json.dumps(data, indent=1) + "\n")
    for name in _STUDY_FILES[1:]:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def _header_stub(src: Path, dst: Path) -> None:
    """``dst``: the NIfTI header of ``src`` and no voxels (gzip, about 100 bytes); nibabel reads its shape and
    affine, and reading its voxels fails (``Expected N bytes``) instead of training on something else."""
    import nibabel as nib

    with gzip.open(dst, "wb") as f:
        f.write(nib.load(str(src)).header.binaryblock + b"\0" * 4)  # + the empty extension flag: a .nii file


def stage_run_data(study_data: str | Path, fraction: float, seed: int, dst: str | Path) -> dict[str, Any]:
    """What the GPU machine needs of a study for run ``(fraction, seed)``: ``dst/study`` = the study's
    ``datalist.json``, ``splits.json``, ``manifest.csv`` (unchanged: :func:`relocate_datalist` moves the paths
    there) and ``dst/<dataset folder>/{imagesTr,labelsTr}`` = copies of the image and label files of the run's
    training, validation and test cases, with the dataset's ``dataset.json`` (its training list cut to them).

    medssl's planner also reads the image headers of every other case it plans from (every seed's validation set and
    largest fraction: one plan per study): those images are header-only stubs (:func:`_header_stub`), so the plan is
    the study's. Hippocampus at 10 %, seed 0: 74 copied cases and 126 stubs, 5.7 MiB instead of 16 (a device call
    carries 64 MiB in all). ``dst/study/staged.json`` lists both.

    Returns:
        ``{"dataset": dst/<dataset folder>, "cases": {role: n}, "files": n copied, "header_stubs": n, "mib": size}``.

    Raises:
        MedsslError: the run's cases lie in more than one dataset folder, or :func:`run_cases`' errors.
    """
    src, dst = Path(study_data), Path(dst)
    cases = run_cases(src, fraction, seed)
    files = sorted({p for role in cases.values() for it in role for key in ("image", "label")
                    for p in (it[key] if isinstance(it[key], list) else [it[key]])})
    roots = {Path(p).parent.parent for p in files}
    if len(roots) != 1:
        raise MedsslError(f"the cases of fraction {fraction} seed {seed} lie in {len(roots)} dataset folders: "
                          f"{sorted(map(str, roots))[:3]}; stage_run_data copies one")
    (root,) = roots
    dataset = dst / root.name
    for p in files:
        target = dataset / Path(p).parent.name / Path(p).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.stat().st_size != Path(p).stat().st_size:
            shutil.copyfile(p, target)
    copied = set(files)
    stubs = sorted({str(p) for it in planning_items(src / "datalist.json", src / "splits.json")
                    for p in (it["image"] if isinstance(it["image"], list) else [it["image"]])} - copied)
    for p in stubs:
        _header_stub(Path(p), dataset / Path(p).parent.name / Path(p).name)
    if (root / "dataset.json").is_file():  # its training list cut to the copied cases
        meta = json.loads((root / "dataset.json").read_text())
        names = {Path(p).name for p in files}
        if isinstance(meta.get("training"), list):
            meta["training"] = [it for it in meta["training"] if Path(str(it.get("image", ""))).name in names]
            meta["numTraining"] = len(meta["training"])
        (dataset / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    (dst / "study").mkdir(parents=True, exist_ok=True)
    for name in _STUDY_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / "study" / name)
    rel = [str(Path(p).relative_to(root)) for p in files]
    staged = {"fraction": fraction, "seed": seed, "copied": rel,
              "header_stubs": [str(Path(p).relative_to(root)) for p in stubs]}
    (dst / "study" / "staged.json").write_text(json.dumps(staged, indent=1) + "\n")
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    return {"dataset": str(dataset), "cases": {r: len(v) for r, v in cases.items()}, "files": len(files),
            "header_stubs": len(stubs), "mib": round(size / 2**20, 2)}


def medssl_steps_for_minutes(minutes: float, s_per_step: float, validation_s: float, val_every_steps: int) -> int:
    """Steps of medssl's run whose training loop (steps + the validations every ``val_every_steps``) takes
    ``minutes``: ``floor(minutes · 60 / (s_per_step + validation_s / val_every_steps))``, at least 1. The nnU-Net
    peer's ``N`` likewise covers its training iterations only (set-up and prediction excluded on both sides).
    Example: 3 min, 0.07 s per step, 3 s per validation every 200 steps → ``180 / 0.085`` = 2,117 steps.

    Raises:
        MedsslError: a non-positive minutes, seconds per step or validation interval.
    """
    if minutes <= 0 or s_per_step <= 0 or val_every_steps < 1:
        raise MedsslError(f"minutes ({minutes}), s per step ({s_per_step}) and val_every_steps ({val_every_steps}) "
                          "must be > 0")
    return max(1, math.floor(minutes * 60.0 / (s_per_step + max(0.0, validation_s) / val_every_steps)))


def _timed_validation_cases(pipeline: dict[str, Any], dataset: Path) -> int:
    """Validation cases of ``benchmarks/finetune_step_time.py``'s timing run on ``dataset`` (its own split)."""
    import tempfile

    from finetune_step_time import _datalist  # the timing script's split, recomputed (deterministic)

    with tempfile.TemporaryDirectory() as tmp:
        _, sp = _datalist(dataset, Path(tmp), pipeline["data"].get("test_fraction", 0.2),
                          pipeline["data"].get("val_fraction", 0.1))
        return len(json.loads(sp.read_text())["seeds"]["0"]["validation"])


def _medssl_config(args: argparse.Namespace) -> int:
    """The pipeline's ``finetune`` section as a ``medssl finetune -c`` YAML with ``max_steps`` for the budget (or
    ``--steps``); prints the steps. The timed validation (``finetune_step_time.py``: its own split of
    ``--timing-dataset``) is scaled per case to the run's validation set."""
    pipeline = yaml.safe_load(Path(args.pipeline).read_text())
    section = dict(pipeline["finetune"])
    timing = json.loads(Path(args.timing).read_text()) if args.timing and Path(args.timing).is_file() else None
    every = int(section.get("val_every_steps") or 0) or 10**9
    n_val = len(run_cases(args.study_data, args.fraction, args.seed)["validation"])
    budget: dict[str, Any] = {"minutes": args.minutes, "val_every_steps": section.get("val_every_steps"),
                              "timing": timing, "pipeline": str(args.pipeline), "validation_cases": n_val}
    if args.steps:
        steps, budget["source"] = args.steps, "--steps"
    elif timing is None:
        raise MedsslError(f"no step timing {args.timing} (benchmarks/finetune_step_time.py failed?) and no --steps")
    else:
        timed = _timed_validation_cases(pipeline, args.timing_dataset)
        val_s = timing["validation_s"] * n_val / max(1, timed)
        steps = medssl_steps_for_minutes(args.minutes, timing["s_per_step"], val_s, every)
        budget.update(source="timing", timed_validation_cases=timed, validation_s=round(val_s, 2))
    section["max_steps"] = budget["steps"] = steps
    Path(args.dst).write_text(yaml.safe_dump(section, sort_keys=False))
    Path(args.dst).with_suffix(".json").write_text(json.dumps(budget, indent=1) + "\n")
    sys.stdout.write(f"{steps}\n")
    return 0


def _row(arm: str, budget: str, steps: str, train_s: float | None, m: dict[str, float]) -> str:
    k = sorted(int(key.split("_")[1]) for key in m if key.startswith("dice_") and key[5:].isdigit())
    dice = " / ".join(f"{m[f'dice_{c}']:.3f}" for c in k)
    missed = " / ".join(f"{int(m.get(f'missed_{c}', 0))}" for c in k)
    wall = f"{train_s / 60:.1f}" if train_s is not None else "–"
    return (f"| {arm} | {budget} | {steps} | {wall} | {m['dice_mean']:.4f} | {dice} | {m.get('hd95_mean', float('nan')):.2f} "
            f"| {missed} |")


def _steps_record(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, wall, cap = line.split("\t")
        out.append({"step": name, "rc": int(rc), "wall_s": float(wall), "cap_s": float(cap), "timed_out": rc == "124"})
    return out


def gpu_peer_report(work: str | Path, out: str | Path, *, minutes: float, dry_run: bool = False) -> dict[str, Any]:
    """``out/gpu_peer.json`` + ``out/gpu_peer.md``: both arms of ``benchmarks/gpu_peer.sh`` (test Dice mean and per
    class, HD95 in mm, steps, training wall minutes), the machine, versions, the budget and every step's exit code
    and wall time, from what the script left in ``work``: ``env.json``, ``steps.tsv``, ``medssl_config.json``,
    ``medssl_train_s.txt``, ``medssl/results.json`` and ``peer/*/result.json``. An arm that did not finish is
    listed as missing."""
    work, out = Path(work), Path(out)
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    arms: list[dict[str, Any]] = []
    budget = json.loads((work / "medssl_config.json").read_text()) if (work / "medssl_config.json").is_file() else {}
    res_path = work / "medssl" / "results.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        train_s = (work / "medssl_train_s.txt").read_text().strip() if (work / "medssl_train_s.txt").is_file() else ""
        cfg = yaml.safe_load((work / "medssl" / "config.yaml").read_text()) if (work / "medssl" / "config.yaml").is_file() else {}
        arms.append({"arm": "medssl planner UNet (scratch)", "steps": budget.get("steps"),
                     "batch": cfg.get("batch_size"), "seconds_wall": float(train_s) if train_s else None,
                     "s_per_step_measured": (budget.get("timing") or {}).get("s_per_step"),
                     "roi_size": cfg.get("roi_size"),  # the timed run plans on its own split: its patch may differ
                     "roi_size_timed": ((budget.get("timing") or {}).get("resolved") or {}).get("roi_size"),
                     "metrics": res.get("test_metrics", {}), "status": res.get("status"),
                     "best_epoch": res.get("best_epoch")})
    for r in sorted((work / "peer").glob("*/result.json")):
        p = json.loads(r.read_text())
        arms.append({"arm": f"nnU-Net v2 3d_fullres ({p['batch_spec']})", "steps": p["iterations"], "batch": p["batch"],
                     "seconds_wall": p["seconds_train"], "s_per_step_measured": (p.get("probe") or {}).get("chosen_s_per_it"),
                     "metrics": p["metrics"], "n_proc_da": p.get("n_proc_da"), "versions": p.get("versions"),
                     "run": r.parent.name})
    nn_versions = next((a["versions"] for a in arms if a.get("versions")), {})
    report = {"dry_run": dry_run, "minutes": minutes, "machine": env, "nnunet_versions": nn_versions, "arms": arms,
              "steps": _steps_record(work / "steps.tsv")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_peer.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    gpu = env.get("gpu") or "no GPU"
    lines = [f"### medssl vs nnU-Net v2 at equal GPU minutes ({minutes:g} min of training each){' — DRY RUN (CPU, tiny budgets)' if dry_run else ''}",
             "", f"Machine: {gpu}, torch {env.get('torch')}, CUDA {env.get('cuda')}, MONAI {env.get('monai')}, "
             f"nnunetv2 {nn_versions.get('nnunetv2')}, Python {env.get('python')}, {env.get('nproc')} CPUs ({env.get('cpu')}).",
             "", "Same training cases (the study's splits), same 40 test cases, scored by the same metric code on each label's "
             "grid. medssl: pipelines/recipe_check.yaml's finetune recipe from scratch as the study runs it (fp32, "
             "validation every 200 steps, best checkpoint tested with the L/R flip); nnU-Net: the stock 3d_fullres "
             "trainer cut to N iterations (fp16 autocast on CUDA, torch.compile off, checkpoint_final, mirroring TTA). "
             "Steps fill the minutes by each arm's own timing (validation included for medssl); the wall minutes are "
             "the whole training command (start-up, training, medssl's test).",
             "", "| arm | budget | steps × batch | training command wall min | test Dice mean | Dice per class | "
             "HD95 mean (mm) | missed per class |", "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        lines.append(_row(a["arm"], f"{minutes:g} min", f"{a['steps']} × {a['batch']}", a["seconds_wall"], a["metrics"])
                     if a["metrics"] else f"| {a['arm']} | {minutes:g} min | – | – | (no test metrics) | | | |")
    for name in ("medssl", "nnU-Net"):
        if not any(a["arm"].startswith(name) for a in arms):
            lines.append(f"| {name} | {minutes:g} min | – | – | (arm did not finish: see steps) | | | |")
    lines += ["", "| step | exit code | wall s | cap s |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']}{' (timed out)' if s['timed_out'] else ''} | {s['wall_s']:.0f} | {s['cap_s']:.0f} |"
              for s in report["steps"]]
    (out / "gpu_peer.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="helpers of benchmarks/gpu_peer.sh (module docstring)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="the run's cases + the study's files for the GPU machine (stage_run_data)")
    re_ = sub.add_parser("relocate", help="the study's datalist with paths into --dataset (relocate_datalist)")
    for p in (st, re_):
        p.add_argument("--study-data", type=Path, required=True)
        p.add_argument("--dst", type=Path, required=True)
    st.add_argument("--fraction", type=float, required=True)
    st.add_argument("--seed", type=int, required=True)
    re_.add_argument("--dataset", type=Path, required=True, help="the dataset folder (imagesTr/, labelsTr/)")
    mc = sub.add_parser("medssl-config", help="the pipeline's finetune section with max_steps for --minutes")
    mc.add_argument("--pipeline", type=Path, required=True)
    mc.add_argument("--timing", type=Path, help="benchmarks/finetune_step_time.py's JSON")
    mc.add_argument("--timing-dataset", type=Path, help="the MSD folder that script timed")
    mc.add_argument("--study-data", type=Path, required=True)
    mc.add_argument("--fraction", type=float, required=True)
    mc.add_argument("--seed", type=int, required=True)
    mc.add_argument("--minutes", type=float, required=True)
    mc.add_argument("--steps", type=int, help="fixed steps instead of the timing (dry run)")
    mc.add_argument("--dst", type=Path, required=True)
    rp = sub.add_parser("report", help="gpu_peer.json + gpu_peer.md")
    rp.add_argument("--work", type=Path, required=True)
    rp.add_argument("--out", type=Path, required=True)
    rp.add_argument("--minutes", type=float, required=True)
    rp.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.cmd == "stage":
            sys.stdout.write(json.dumps(stage_run_data(args.study_data, args.fraction, args.seed, args.dst)) + "\n")
        elif args.cmd == "relocate":
            relocate_datalist(args.study_data, args.dst, args.dataset)
        elif args.cmd == "medssl-config":
            return _medssl_config(args)
        else:
            gpu_peer_report(args.work, args.out, minutes=args.minutes, dry_run=args.dry_run)
    except MedsslError as e:
        log.error("%s: %s", args.cmd, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
