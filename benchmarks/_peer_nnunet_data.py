"""Data side of the nnU-Net peer (``benchmarks/peer_nnunet.py``): the nnU-Net raw dataset of one medssl run's
cases, the plans batch edit, the budget arithmetic and the evaluation of nnU-Net's predictions with medssl's
own metric code. Runs in medssl's venv; nothing here imports nnunetv2.

Run as a script it serves ``benchmarks/gpu_peer.sh`` (the equal-GPU-minutes comparison)::

    python benchmarks/_peer_nnunet_data.py stage --study-data S --fraction 10 --seed 0 --dst .gpu/peer
    python benchmarks/_peer_nnunet_data.py relocate --study-data S --dataset DIR --dst W/study
    python benchmarks/_peer_nnunet_data.py medssl-config --pipeline P --timing T --minutes 3 --dst W/cfg.yaml
    python benchmarks/_peer_nnunet_data.py report --work W --out O --minutes 3 [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from medssl.engines.finetune.data import finetune_items, planning_items
from medssl.engines.finetune.metrics import SegmentationMetrics
from medssl.errors import MedsslError

__all__ = [
    "run_cases",
    "nnunet_labels",
    "channel_names",
    "write_raw_dataset",
    "plans_with_batch",
    "resolve_batch",
    "MIN_BATCH",
    "probe_seconds_per_iteration",
    "iterations_for_minutes",
    "evaluate_predictions",
    "relocate_datalist",
    "stage_run_data",
    "medssl_steps_for_minutes",
    "gpu_peer_report",
]

log = logging.getLogger(__name__)

#: the smallest batch nnU-Net's planner ever gives (ExperimentPlanner: ``batch_size = max(2, ...)``)
MIN_BATCH = 2
_CASES_FILE = "medssl_cases.json"


def run_cases(study_data: str | Path, fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The cases of medssl's finetuning run ``(fraction, seed)`` on ``study_data/{datalist,splits}.json``:
    :func:`medssl.engines.finetune.data.finetune_items` itself (``training`` = the seed's fraction,
    ``validation`` = the seed's validation set, ``test`` = the fixed test set)."""
    study_data = Path(study_data)
    return finetune_items(study_data / "datalist.json", study_data / "splits.json", fraction=fraction, seed=seed)


def nnunet_labels(datalist: str | Path, label_files: Sequence[str] = ()) -> dict[str, int]:
    """nnU-Net's ``labels`` (name → index, ``background`` = 0) from the datalist's class table
    (``{"0": "background", "1": "Anterior", …}``); without one, ``class_<i>`` up to the largest value of
    ``label_files``.

    Raises:
        MedsslError: a table without index 0, with gaps or duplicate names, or no table and no label files.
    """
    table = json.loads(Path(datalist).read_text()).get("labels")
    if not table:
        if not label_files:
            raise MedsslError(f"{datalist} has no 'labels' class table and no label files were given")
        import nibabel as nib  # only for this fallback

        k = max(int(round(float(nib.load(p).get_fdata().max()))) for p in label_files)
        table = {"0": "background", **{str(i): f"class_{i}" for i in range(1, k + 1)}}
    idx = sorted(int(i) for i in table)
    if idx != list(range(len(idx))) or len(idx) < 2:
        raise MedsslError(f"{datalist}: class table indices must be 0..K-1 with K >= 2, got {idx}")
    names = ["background"] + [str(table[str(i)]) for i in idx[1:]]  # nnU-Net requires the name 'background'
    if len(set(names)) != len(names):
        raise MedsslError(f"{datalist}: duplicate class names in {names}")
    return {n: i for i, n in enumerate(names)}


def channel_names(items: Sequence[dict[str, Any]], study_data: str | Path) -> dict[str, str]:
    """nnU-Net ``channel_names`` (``{"0": "MRI"}``): the items' ``channels`` names, else the modality of
    ``manifest.csv`` beside the datalist (nnU-Net normalises a ``CT`` channel with its CT scheme and any other
    name with z-score), else ``"MRI"``."""
    if items and items[0].get("channels"):
        return {str(i): str(c) for i, c in enumerate(items[0]["channels"])}
    manifest = Path(study_data) / "manifest.csv"
    modality = "MRI"
    if manifest.exists():
        with manifest.open(newline="") as f:
            ids = {it["case_id"] for it in items}
            for row in csv.DictReader(f):
                if row.get("case_id") in ids and row.get("modality"):
                    modality = row["modality"]
                    break
    return {"0": modality}


def _link(src: str, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(os.path.abspath(src), dst)


def _channels(item: dict[str, Any]) -> list[str]:
    img = item["image"]
    if isinstance(img, (list, tuple)):
        return [str(p) for p in img]
    if item.get("channels") and len(item["channels"]) > 1:
        raise MedsslError(f"case {item['case_id']}: one 4D file {img} holds {len(item['channels'])} channels; "
                          "nnU-Net v2 needs one file per channel (re-ingest the channels as separate files)")
    return [str(img)]


def write_raw_dataset(folder: str | Path, cases: dict[str, list[dict[str, Any]]], *, labels: dict[str, int],
                      channels: dict[str, str], description: str = "") -> Path:
    """Write an nnU-Net v2 raw dataset of symlinks: ``imagesTr/<case>_000c`` + ``labelsTr/<case>`` for the
    ``training`` cases, ``imagesTs/<case>_000c`` for the ``test`` cases (``validation`` is not used: nnU-Net
    trains fold ``all`` and selects nothing on it), ``dataset.json`` and ``medssl_cases.json`` (the case ids).

    Args:
        folder: ``$nnUNet_raw/DatasetXXX_Name``.
        cases: :func:`run_cases` output.
        labels: :func:`nnunet_labels`. channels: :func:`channel_names`.

    Returns:
        ``folder``. An existing dataset with the same case ids is kept as is (resume).

    Raises:
        MedsslError: an existing dataset in ``folder`` was written for other cases (delete it to rewrite).
    """
    folder = Path(folder)
    ids = {"training": [c["case_id"] for c in cases["training"]], "test": [c["case_id"] for c in cases["test"]]}
    marker = folder / _CASES_FILE
    if marker.exists():
        if json.loads(marker.read_text()) == ids:
            return folder
        raise MedsslError(f"{folder} holds an nnU-Net dataset of other cases ({marker}); delete the folder "
                          "and its preprocessed / results folders to rebuild it")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for role, images in (("training", "imagesTr"), ("test", "imagesTs")):
        for it in cases[role]:
            files = _channels(it)
            if len(files) != len(channels):
                raise MedsslError(f"case {it['case_id']} has {len(files)} channels, dataset.json {len(channels)}")
            for c, path in enumerate(files):
                _link(path, folder / images / f"{it['case_id']}_{c:04d}.nii.gz")
            if role == "training":
                _link(it["label"], folder / "labelsTr" / f"{it['case_id']}.nii.gz")
    ds = {"channel_names": channels, "labels": labels, "numTraining": len(cases["training"]),
          "file_ending": ".nii.gz", "name": folder.name, "description": description}
    (folder / "dataset.json").write_text(json.dumps(ds, indent=1) + "\n")
    marker.write_text(json.dumps(ids, indent=1) + "\n")
    log.info("%s: %d training, %d test cases", folder, len(ids["training"]), len(ids["test"]))
    return folder


def resolve_batch(spec: str, planner_batch: int) -> int:
    """``--batch``: ``planner`` → the plan's batch, ``max-iter`` → :data:`MIN_BATCH` (most iterations per
    second), an int → itself.

    Raises:
        MedsslError: anything else, or an int below :data:`MIN_BATCH`.
    """
    if spec == "planner":
        return int(planner_batch)
    if spec == "max-iter":
        return MIN_BATCH
    try:
        b = int(spec)
    except ValueError:
        raise MedsslError(f"--batch must be planner, max-iter or an integer, got {spec!r}") from None
    if b < MIN_BATCH:
        raise MedsslError(f"--batch {b}: nnU-Net's smallest batch is {MIN_BATCH}")
    return b


def plans_with_batch(preprocessed: str | Path, batch: int, *, configuration: str = "3d_fullres",
                     source: str = "nnUNetPlans") -> str:
    """The plans identifier training with ``batch``: ``source`` itself when its batch already is ``batch``, else a
    copy ``<source>_bs<batch>.json`` with ``plans_name`` and ``configurations[configuration].batch_size``
    changed and nothing else (the same ``data_identifier``, so nnU-Net's preprocessed data is reused): nnU-Net's
    documented way to change a plan (``documentation/explanation_plans_files.md``).

    Raises:
        MedsslError: no ``<source>.json`` in ``preprocessed`` or no such configuration.
    """
    src = Path(preprocessed) / f"{source}.json"
    if not src.exists():
        raise MedsslError(f"{src} not found: run nnU-Net's planning first")
    plans = json.loads(src.read_text())
    conf = plans.get("configurations", {}).get(configuration)
    if conf is None:
        raise MedsslError(f"{src} has no configuration {configuration!r}")
    if int(conf["batch_size"]) == int(batch):
        return source
    ident = f"{source}_bs{int(batch)}"
    plans["plans_name"] = ident
    conf["batch_size"] = int(batch)
    (Path(preprocessed) / f"{ident}.json").write_text(json.dumps(plans, indent=1) + "\n")
    return ident


def probe_seconds_per_iteration(step_ends: Sequence[float], warmup: int) -> float:
    """Mean seconds per training iteration after ``warmup`` iterations, from the end times of the steps
    (``(t[-1] − t[warmup−1]) / (len − warmup)``; the time between two step ends includes waiting for the
    augmented batch). Example: ends ``[5, 6, 7.5, 8.5, 9.5]``, warmup 2 → ``(9.5 − 6) / 3 = 1.1667``.

    Raises:
        MedsslError: fewer than ``warmup + 1`` steps or ``warmup < 1``.
    """
    if warmup < 1 or len(step_ends) < warmup + 1:
        raise MedsslError(f"the probe ran {len(step_ends)} iteration(s); it needs > warmup = {warmup}")
    return (step_ends[-1] - step_ends[warmup - 1]) / (len(step_ends) - warmup)


def iterations_for_minutes(minutes: float, seconds_per_iteration: float) -> int:
    """``N = floor(minutes · 60 / s_per_it)``, at least 1. Example: 20 min at 1.07 s/it → 1,121."""
    if minutes <= 0 or seconds_per_iteration <= 0:
        raise MedsslError(f"minutes ({minutes}) and seconds per iteration ({seconds_per_iteration}) must be > 0")
    return max(1, math.floor(minutes * 60.0 / seconds_per_iteration))


def _reader() -> Compose:
    # the native-grid label chain of medssl's evaluation (finetune.data.eval_transforms up to RAS), for both
    keys = ["pred", "label"]
    ras = (("L", "R"), ("P", "A"), ("I", "S"))
    return Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys),
                    Orientationd(keys, axcodes="RAS", labels=ras)])


def evaluate_predictions(pred_dir: str | Path, test: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Score ``pred_dir/<case_id>.nii.gz`` against each test case's label on the label's native grid with
    :class:`medssl.engines.finetune.metrics.SegmentationMetrics` (Dice with the empty-mask conventions, HD95 in mm with
    the image-diagonal penalty, ``missed_<c>``), as medssl's ``evaluate_native`` scores its own runs.

    Returns:
        ``{"metrics": SegmentationMetrics.compute() over all cases, "per_case": {case_id: its compute()}}``.

    Raises:
        MedsslError: a missing prediction file, or a prediction off the label's grid (shape or affine).
    """
    total, per_case, read = SegmentationMetrics(num_classes), {}, _reader()
    for it in test:
        pred = Path(pred_dir) / f"{it['case_id']}.nii.gz"
        if not pred.exists():
            raise MedsslError(f"prediction {pred} of test case {it['case_id']} is missing")
        d = read({"pred": str(pred), "label": it["label"]})
        p, g = d["pred"], d["label"]
        if p.shape != g.shape or not torch.allclose(p.affine.double(), g.affine.double(), atol=1e-3):
            raise MedsslError(f"prediction {pred} is not on the grid of label {it['label']} "
                              f"(shape {tuple(p.shape)} vs {tuple(g.shape)})")
        onehot = torch.nn.functional.one_hot(p.as_tensor().round().long()[0], num_classes)  # (X, Y, Z, K)
        logits = onehot.permute(3, 0, 1, 2)[None].float()  # (1, K, X, Y, Z): argmax = the prediction
        label = g.as_tensor()[None].float()  # (1, 1, X, Y, Z)
        spacing = affine_to_spacing(g.affine, r=3).tolist()
        one = SegmentationMetrics(num_classes)
        for m in (total, one):
            m.update(logits, label, spacing)
        per_case[it["case_id"]] = one.compute()
    return {"metrics": total.compute(), "per_case": per_case}


# ---- the GPU comparison (benchmarks/gpu_peer.sh) -------------------------------------------------------------------

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
