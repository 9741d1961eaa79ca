"""bundles/finetune_seg: `python -m monai.bundle run --config_file …/inference.yaml --ckpt_path best.pt` on 2 real
hippocampus volumes gives `medssl predict`'s labels and affines (resampled recipe: Invertd back to each grid);
`medssl export --bundle` writes a zip that `monai.bundle.load` and `ConfigWorkflow` read locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medssl.cli import app
from medssl.deploy.bundle import BUNDLE_DIR, folder_datalist, load_bundle_model
from medssl.deploy.model import load_model
from medssl.deploy.predict import predict
from medssl.errors import MedsslError
from tests.deploy._finetuned import finetune_seg

REPO = Path(__file__).resolve().parents[2]
SPACING = [1.25, 1.0, 1.5]  # a resampled recipe: the bundle must invert Spacingd like predict does


@pytest.fixture(scope="module")
def seg_run(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, out = finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("bundle_ft"), target_spacing=SPACING)
    return out


@pytest.fixture(scope="module")
def scans(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 2 real hippocampus volumes (not training cases of `seg_run`)."""
    folder = tmp_path_factory.mktemp("scans")
    for src in sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[20:22]:
        (folder / src.name).symlink_to(src)
    return folder


def _assert_same_as_predict(seg_run: Path, scans: Path, bundle_out: Path, ref_out: Path) -> None:
    ref = predict(seg_run, [scans], ref_out)
    assert ref.exit_code == 0 and len(ref.ok) == 2
    for row in ref.ok:
        want = nib.load(row["outputs"]["seg"])
        got = nib.load(bundle_out / Path(row["outputs"]["seg"]).name)
        src = nib.load(scans / f"{row['case']}.nii.gz")
        assert got.shape == src.shape == want.shape
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj)), row["case"]
        assert np.allclose(got.affine, src.affine, atol=1e-4)


def test_monai_bundle_run_equals_medssl_predict(seg_run: Path, scans: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_DIR / "configs" / "inference.yaml"),
           "--meta_file", str(BUNDLE_DIR / "configs" / "metadata.json"),
           "--ckpt_path", str(seg_run / "checkpoints" / "best.pt"), "--dataset_dir", str(scans),
           "--output_dir", str(tmp_path / "bundle_out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as_predict(seg_run, scans, tmp_path / "bundle_out", tmp_path / "ref")


def test_export_bundle_zip_reads_locally(seg_run: Path, scans: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow
    from monai.bundle import load as bundle_load

    from medssl.engines.finetune.build import rebuild_model

    res = CliRunner().invoke(app, ["export", str(seg_run), "--bundle", str(tmp_path / "hippo.zip")])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(tmp_path / "hippo.zip") as z:
        names = set(z.namelist())
        assert {"hippo/configs/inference.yaml", "hippo/configs/metadata.json", "hippo/configs/recipe.json",
                "hippo/models/model.pt"} <= names
        z.extractall(tmp_path / "bundles")
    root = tmp_path / "bundles" / "hippo"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "Anterior", "2": "Posterior"}
    recipe = json.loads((root / "configs" / "recipe.json").read_text())
    # monai.bundle.load: weights only (torch.load weights_only=True), from the local folder, no download
    net = bundle_load("hippo", model=rebuild_model(recipe["recipe"]), bundle_dir=tmp_path / "bundles",
                      source="github", device="cpu", progress=False)
    x = torch.rand(1, 1, 24, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net.eval()(x), load_model(seg_run).network(x))
    wf = ConfigWorkflow(config_file=str(root / "configs" / "inference.yaml"),
                        meta_file=str(root / "configs" / "metadata.json"), workflow_type="infer",
                        bundle_root=str(root), dataset_dir=str(scans), output_dir=str(tmp_path / "zip_out"))
    wf.initialize()
    wf.run()
    wf.finalize()
    _assert_same_as_predict(seg_run, scans, tmp_path / "zip_out", tmp_path / "ref")


def test_bundle_errors(seg_run: Path, tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="no .nii.gz"):
        folder_datalist(tmp_path)
    sd = tmp_path / "model.pt"
    torch.save(load_model(seg_run).network.state_dict(), sd)
    with pytest.raises(MedsslError, match="recipe_path"):
        load_bundle_model(sd, tmp_path / "missing.json")
    res = CliRunner().invoke(app, ["export", str(seg_run), "--bundle", str(tmp_path / "x.tar")])
    assert res.exit_code == 1 and ".zip" in res.output
    res = CliRunner().invoke(app, ["export", str(seg_run)])
    assert res.exit_code == 2
