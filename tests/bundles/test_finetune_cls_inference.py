"""bundles/finetune_cls/configs/inference.yaml: `python -m monai.bundle run` on a folder of real AdrenalMNIST3D volumes
writes one CSV row per case whose class and probabilities equal the library's (medssl.deploy.model.load_model +
the recipe's preprocess_transforms + softmax) within 1e-5, and whose accuracy / AUC on the test cases equal the
test metrics `medssl finetune` reported for the same checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.deploy._finetuned import finetune_cls

REPO = Path(__file__).resolve().parents[2]
CLS = REPO / "bundles" / "finetune_cls" / "configs"


def _library_probs(ckpt: Path, images: list[Path]) -> dict[str, torch.Tensor]:
    from medssl.deploy.model import load_model
    from medssl.transforms.preprocess import preprocess_transforms

    m = load_model(ckpt)
    chain = preprocess_transforms(m.preprocessing)
    out = {}
    with torch.no_grad():
        for p in images:
            x = chain({"image": str(p)})["image"].as_tensor()
            out[str(p)] = torch.softmax(m.network(x[None]).float(), dim=1)[0]
    return out


def test_cls_inference_equals_library_and_cli_metrics(medmnist_dir: Path, tmp_path: Path) -> None:
    from medssl.engines.finetune.data import finetune_items
    from medssl.engines.finetune.metrics import classification_metrics

    _, run = finetune_cls(medmnist_dir, tmp_path)
    ckpt = run / "checkpoints" / "best.pt"
    test = finetune_items(tmp_path / "datalist.json", tmp_path / "splits.json", fraction=100, seed=0,
                          task="classification")["test"]
    scans = tmp_path / "scans"
    scans.mkdir()
    for it in test:  # the test cases alone in a folder, as a user would point the bundle at one
        (scans / Path(it["image"]).name).symlink_to(Path(it["image"]).resolve())
    labels = {(scans / Path(it["image"]).name).name: int(it["label"]) for it in test}
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CLS / "inference.yaml"),
           "--meta_file", str(CLS / "metadata.json"), "--ckpt_path", str(ckpt), "--dataset_dir", str(scans),
           "--output_dir", str(out), "--batch_size", "3", "--device", "$torch.device('cpu')"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test) >= 2
    names = ["class_0", "class_1"]
    assert list(rows[0]) == ["image", "case", "pred_class", "pred_name"] + [f"prob_{n}" for n in names]
    want = _library_probs(ckpt, sorted(scans.iterdir()))
    for row in rows:
        probs = torch.tensor([float(row[f"prob_{n}"]) for n in names])
        ref = want[row["image"]]
        assert torch.allclose(probs, ref, atol=1e-5), (row, ref)
        assert int(row["pred_class"]) == int(ref.argmax()) and row["pred_name"] == names[int(ref.argmax())]
        assert sum(probs.tolist()) == pytest.approx(1.0, abs=1e-6)
        assert row["case"] == Path(row["image"]).name.removesuffix(".nii.gz")
    # the CLI's test metrics of the same checkpoint, from the CSV's probabilities (log p: softmax gives p back)
    cli = json.loads((run / "results.json").read_text())["test_metrics"]
    logp = torch.stack([torch.tensor([float(r[f"prob_{n}"]) for n in names]) for r in rows]).log()
    y = torch.tensor([labels[Path(r["image"]).name] for r in rows])
    got = classification_metrics(logp, y)
    for k in ("accuracy", "balanced_accuracy", "auc"):
        assert got[k] == pytest.approx(cli[k], abs=1e-6) or (math.isnan(got[k]) and math.isnan(cli[k])), k
