"""Smoke test of the pretraining bundle with the override ids a user types on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "ssl_pretrain"


@pytest.fixture
def tiny_datalist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        p = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=(20, 22, 18)).astype(np.float32), np.eye(4)), str(p))
        items.append({"image": p.name, "case_id": f"c{i}"})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": [], "unlabeled": items}))
    return dl


def test_bundle_runs_and_writes_a_loadable_encoder(tiny_datalist: Path, tmp_path: Path, monkeypatch):
    from monai.bundle import run

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    run(config_file=str(BUNDLE / "configs" / "train.yaml"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        datalist=str(tiny_datalist), output_dir=str(out), total_steps=2, batch_size=2, roi_size=[16, 16, 16],
        encoder_kwargs={"init_filters": 8}, warmup_steps=0, checkpoint_every=1, experiment=None)
    assert (out / "checkpoints" / "last.pt").is_file()
    enc = torch.load(out / "encoder.pt", map_location="cpu", weights_only=False)
    assert "recipe" in enc
    meta = json.loads((out / "encoder.json").read_text())
    assert meta  # how-to-load description written next to the weights


def test_bundle_metadata_and_variant_are_overrides_only():
    import yaml

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] and meta["monai_version"]
    base = yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())
    multi = yaml.safe_load((BUNDLE / "configs" / "multi_gpu_train.yaml").read_text())
    assert set(multi) <= set(base)  # the variant only overrides existing ids
