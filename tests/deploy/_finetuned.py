"""Tiny real finetuning runs for the deploy tests (hippocampus segmentation, AdrenalMNIST3D classification).

Plain functions (not fixtures) so every deploy test module can build the runs it needs in its own
module-scoped fixtures: ``finetune_seg(hippocampus_dir, tmp)`` → ``(Finetuner, out_dir)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.splits import split_datalist
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import Finetuner
from medssl.engines.finetune.result import open_tracker

SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}
CLS_NET = {"depth": 10, "widen_factor": 0.125, "conv1_t_size": 3, "conv1_t_stride": 2}
HIPPO_CLASSES = {"0": "background", "1": "Anterior", "2": "Posterior"}


def hippo_data(hippocampus_dir: Path, tmp: Path, n: int = 6) -> tuple[Path, Path]:
    """``n`` real hippocampus cases (datalist with the MSD class table) and their splits."""
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:n]
    items = [{"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name),
              "case_id": p.name[: -len(".nii.gz")]} for p in images]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "datalist.json").write_text(json.dumps({"training": items, "labels": HIPPO_CLASSES}))
    splits, _ = split_datalist(tmp / "datalist.json", fractions=[100], seeds=[0], test_fraction=0.2,
                               val_fraction=0.2)
    return tmp / "datalist.json", Path(splits)


def finetune_seg(hippocampus_dir: Path, tmp: Path, **kw: Any) -> tuple[Finetuner, Path]:
    """A 2-step SegResNet finetuning on real hippocampus volumes (16³ crops); returns the fitted
    ``Finetuner`` (its model holds the best weights; ``.tracker.run_id`` with ``experiment`` and
    ``tracking_uri`` in ``kw``) and the run folder."""
    datalist, splits = hippo_data(hippocampus_dir, tmp / "data")
    out = tmp / "seg_run"
    cfg = FinetuneConfig(**({
        "datalist": str(datalist), "splits": str(splits), "network": "SegResNet", "network_kwargs": SEG_NET,
        "out_channels": 3, "roi_size": [16, 16, 16], "batch_size": 2, "num_samples": 1, "max_steps": 2,
        "sw_overlap": 0.25, "sw_batch_size": 4, "lr": 1e-2, "device": "cpu", "deterministic": True,
        "out_dir": str(out), "experiment": None, "augment": {"flip_axes": [0]},
    } | kw))
    tracker = open_tracker(cfg, None) if cfg.experiment else None
    ft = Finetuner(cfg, tracker=tracker)
    ft.fit(progress=False)
    if tracker is not None:
        tracker.close("FINISHED")
    return ft, out



def adrenal_subset(
    medmnist_dir: Path, tmp: Path, counts: dict[str, tuple[int, int]], salt: str
) -> tuple[Path, Path]:
    """The first ``(n class 0, n class 1)`` real AdrenalMNIST3D volumes of each official split (``train`` /
    ``val`` / ``test``) as NIfTI in ``tmp``: ``(datalist.json, splits.json)`` with one 100 % fraction, seed 0."""
    from medssl.data.medmnist import convert_medmnist

    tmp.mkdir(parents=True, exist_ok=True)
    z = np.load(medmnist_dir / "adrenalmnist3d.npz")
    arrays = {}
    for split, (n0, n1) in counts.items():
        lab = z[f"{split}_labels"][:, 0]
        idx = np.concatenate([np.flatnonzero(lab == 0)[:n0], np.flatnonzero(lab == 1)[:n1]])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    np.savez(tmp / "adrenalmnist3d.npz", **arrays)
    items = convert_medmnist(tmp / "adrenalmnist3d.npz", tmp / "nifti", salt=salt)
    sections = {s: [it for it in items if it["split"] == s] for s in ("training", "validation", "test")}
    (tmp / "datalist.json").write_text(json.dumps(sections))
    splits, _ = split_datalist(tmp / "datalist.json", fractions=[100], seeds=[0])
    return tmp / "datalist.json", Path(splits)

def finetune_cls(medmnist_dir: Path, tmp: Path) -> tuple[Finetuner, Path]:
    """A 1-epoch ResNet-10 classification of 16 real AdrenalMNIST3D volumes (28³)."""
    splits = adrenal_subset(medmnist_dir, tmp, {"train": (4, 4), "val": (2, 2), "test": (2, 2)}, "deploy-test")[1]
    out = tmp / "cls_run"
    cfg = FinetuneConfig(
        datalist=str(tmp / "datalist.json"), splits=str(splits), task="classification", network="ResNet",
        network_kwargs=CLS_NET, num_classes=2, roi_size=[28, 28, 28], normalisation="none", batch_size=4,
        max_epochs=1, device="cpu", deterministic=True, out_dir=str(out), experiment=None,
    )
    ft = Finetuner(cfg)
    ft.fit(progress=False)
    return ft, out
