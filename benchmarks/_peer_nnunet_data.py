"""Data side of the nnU-Net peer (``benchmarks/peer_nnunet.py``): the nnU-Net raw dataset of one medssl run's
cases, the plans batch edit, the budget arithmetic and the evaluation of nnU-Net's predictions with medssl's
own metric code. Runs in medssl's venv; nothing here imports nnunetv2. The GPU comparison's helpers
(``benchmarks/gpu_peer.sh``) are in ``benchmarks/_gpu_peer.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from medssl.engines.finetune.data import finetune_items
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
