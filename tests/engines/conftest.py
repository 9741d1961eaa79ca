"""Engine fixtures: tiny generated NIfTI volumes and a matching datalist."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.config import PretrainConfig

TOYS = "tests.engines._toys"


def write_volumes(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """``n`` random NIfTI volumes (sizes 14–24 voxels per side, scales 1–1000) + ``datalist.json``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(14, 25, size=3))
        data = (rng.random(shape) * 10 ** rng.integers(0, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"vol{i}.nii.gz")
        items.append({"image": f"vol{i}.nii.gz", "case_id": f"case{i}"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "unlabeled": items}))
    return path


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("vols"))


def toy_config(datalist: Path, out: Path, **kw) -> PretrainConfig:
    """A CPU config on the toys: 16³ crops, batch 2, 6 steps, no MLflow, deterministic."""
    base = dict(
        datalist=str(datalist),
        method=f"{TOYS}:toy_method",
        encoder=f"{TOYS}:tiny_encoder",
        augment=f"{TOYS}:toy_augment",
        roi_size=[16, 16, 16],
        batch_size=2,
        total_steps=6,
        lr=1e-2,
        warmup_steps=2,
        device="cpu",
        deterministic=True,
        out_dir=str(out),
        experiment=None,
        preview=False,
    )
    base.update(kw)
    return PretrainConfig(**base)
