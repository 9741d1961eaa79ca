"""A tiny real segmentation study on disk: noise volumes with a bright cube labelled 1, split for finetuning."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.data.splits import split_datalist

__all__ = ["cube_study"]


def cube_study(folder: Path, n: int = 5) -> tuple[Path, Path]:
    """``n`` cases of 16³ voxels (N(0, 1) noise + 2 inside a 6×6×6 cube labelled 1, cube position varying by case),
    a MONAI datalist and ``splits.json`` (fraction 100, seed 0, 20 % test, 20 % validation): ``(datalist, splits)``."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        lab = np.zeros((16, 16, 16), np.uint8)
        o = 3 + i % 4
        lab[o : o + 6, o : o + 6, 4:10] = 1
        img = (rng.normal(size=lab.shape) + 2 * lab).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"case{i}"})
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(folder / "datalist.json", fractions=[100], seeds=[0], test_fraction=0.2,
                               val_fraction=0.2)
    return folder / "datalist.json", splits
