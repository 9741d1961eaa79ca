"""benchmarks/probe_encoders.py: frozen-encoder linear / kNN probes on the validation split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.engines.runtime.checkpoint import save_encoder
from medssl.networks.encoders import build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_encoders as pe  # noqa: E402


def _ball(radius: float, shift: int, size: int = 16) -> np.ndarray:
    g = np.indices((size,) * 3).astype(np.float32) - (size - 1) / 2 - shift
    return (np.sqrt((g**2).sum(0)) <= radius).astype(np.float32) * 255


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, Path]:
    """Shape masks whose class is the ball's size (small 3 vs large 6 voxels), as AdrenalMNIST3D's; an encoder
    file of the recipe the study's pretraining writes."""
    rng = np.random.default_rng(0)
    items: dict[str, list] = {"training": [], "validation": []}
    for split, n in (("training", 40), ("validation", 16)):
        for i in range(n):
            y = i % 2
            img = _ball(6.0 if y else 3.0, int(rng.integers(-1, 2)))
            name = f"{split}_{i}.nii.gz"
            nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / name)
            items[split].append({"image": name, "class": y, "case_id": f"{split}{i}"})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps(items))
    torch.manual_seed(0)
    enc = build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.25)
    pt, _ = save_encoder(tmp_path / "enc", enc, {"encoder": enc.recipe})
    return dl, pt


def test_probes_score_validation_for_each_encoder(study: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    dl, pt = study
    out = tmp_path / "probe.json"
    res = pe.main(["--datalist", str(dl), "--encoder", f"trained={pt}", "--encoder", f"random=random:{pt}",
                   "--roi", "16", "16", "16", "--fractions", "25", "100", "--seeds", "0", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["n_train"] == 40 and res["n_val"] == 16
    for name in ("trained", "random"):
        row = res["encoders"][name]
        assert len(row["f25"]["linear_auc"]) == 2 and len(row["f100"]["linear_auc"]) == 1  # 100 %: one fit
        # size is linearly visible in any conv net's pooled features: the probes must find it
        assert min(row["f100"]["linear_auc"] + row["f100"]["knn_auc"]) > 0.9
    # "random" rebuilds the recipe with fresh weights: other embeddings than the file's (same seed, same init
    # here, so equal weights would mean the file was not loaded)
    enc, _ = pe.load_encoder(str(pt), seed=1)
    rnd, _ = pe.load_encoder(f"random:{pt}", seed=1)
    saved = torch.load(pt, weights_only=False)["state_dict"]
    k = next(iter(saved))
    assert torch.equal(enc.state_dict()[k], saved[k]) and not torch.equal(rnd.state_dict()[k], saved[k])
    table = capsys.readouterr().out
    assert "| trained |" in table and "| random |" in table


def test_knn_auc_and_subset() -> None:
    y = np.array([0] * 10 + [1] * 10)
    feats = np.concatenate([np.tile([1.0, 0.0], (10, 1)), np.tile([0.0, 1.0], (10, 1))])
    feats = feats + np.random.default_rng(0).normal(0, 0.05, feats.shape)
    assert pe.knn_auc(feats, y, feats, y, k=5) == 1.0
    assert pe.knn_auc(feats, y, feats, 1 - y, k=5) == 0.0
    idx = pe.subset(y, 0.1, seed=0)
    assert len(idx) == 4 and set(y[idx]) == {0, 1}  # at least 2 per class
    assert not np.array_equal(pe.subset(y, 0.5, 0), pe.subset(y, 0.5, 1))
