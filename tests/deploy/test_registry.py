"""`medssl register` on a tiny real finetuning run (hippocampus): a registered pyfunc version with alias, tags,
description and input example; loaded with ``mlflow.pyfunc.load_model("models:/…@champion")`` in a fresh
process it gives `medssl predict`'s labels voxel for voxel; `medssl predict models:/…@champion` (NIfTI and
``--dicom-seg`` on the real CT series: the README's commands 3 and 4); a run folder outside the store; errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.deploy.predict import predict
from medssl.deploy.registry import register_model
from medssl.errors import MedsslError
from tests.deploy._finetuned import finetune_seg

REPO = Path(__file__).resolve().parents[2]
NAME = "hippo-seg"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def seg(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str):
    """A 2-step finetuning tracked in ``mlflow_uri`` (test metrics logged), registered with the CLI."""
    ft, out = finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("seg"), experiment="deploy-registry",
                           tracking_uri=mlflow_uri)
    res = CliRunner().invoke(app, ["register", ft.tracker.run_id, "--name", NAME, "--alias", "champion"],
                             env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert res.exit_code == 0, res.output
    assert f"models:/{NAME}@champion" in res.output
    return ft, out


def _labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_version_alias_tags_description_and_example(seg, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    ft, _ = seg
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert mv.run_id == ft.tracker.run_id  # logged into the finetune run itself
    metrics = {k: v for k, v in client.get_run(mv.run_id).data.metrics.items() if k.startswith("test_")}
    assert "test_dice_mean" in metrics
    for k, v in metrics.items():
        assert float(mv.tags[f"medssl.test.{k[5:]}"]) == pytest.approx(v)
        assert k[5:] in mv.description
    assert json.loads(mv.tags["medssl.recipe.class_names"]) == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert json.loads(mv.tags["medssl.recipe.roi_size"]) == [16, 16, 16]
    assert mv.tags["medssl.network"] == "SegResNet" and client.get_run(mv.run_id).info.status == "FINISHED"
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{mv.version}", tracking_uri=mlflow_uri))
    assert sorted(p.name for p in local.rglob("*.pt")) == ["best.pt"]
    assert json.loads(next(local.rglob("recipe.json")).read_text())["preprocessing"]["task"] == "segmentation"
    mlmodel = (local / "MLmodel").read_text()
    assert "nifti_b64" in mlmodel and "seg_nifti_b64" in mlmodel  # the signature
    assert (local / "serving_input_example.json").is_file()


def test_fresh_process_load_equals_medssl_predict(seg, mlflow_uri: str, hippocampus_dir: Path,
                                                  tmp_path: Path) -> None:
    vols = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[20:22]
    script = (
        "import sys, json, mlflow.pyfunc, pandas as pd\n"
        "from medssl.deploy.pyfunc import encode_nifti\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "out = m.predict(pd.DataFrame({'nifti_b64': [encode_nifti(p) for p in sys.argv[2:]]}))\n"
        "open(sys.argv[1], 'w').write(json.dumps(list(out['seg_nifti_b64'])))\n"
    )
    res_file = tmp_path / "served.json"
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(res_file), *map(str, vols)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from medssl.deploy.pyfunc import decode_labels

    served = [decode_labels(b) for b in json.loads(res_file.read_text())]
    ref = predict(seg[1], vols, tmp_path / "ref")
    assert ref.exit_code == 0
    for (labels, affine), row, vol in zip(served, ref.ok, vols, strict=True):
        want, want_affine = _labels(row["outputs"]["seg"])
        assert labels.shape == nib.load(vol).shape and np.array_equal(labels, want)
        assert np.allclose(affine, nib.load(vol).affine, atol=1e-5) and np.allclose(affine, want_affine)


def test_readme_predict_commands_with_the_registered_model(seg, mlflow_uri: str, hippocampus_dir: Path,
                                                           tmp_path: Path) -> None:
    """README commands 3 and 4: `medssl predict models:/NAME@champion` on a NIfTI file and a DICOM series."""
    vol = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[21]
    env = {"MLFLOW_TRACKING_URI": mlflow_uri}
    res = CliRunner().invoke(app, ["predict", f"models:/{NAME}@champion", str(vol), "--out", str(tmp_path / "n")],
                             env=env)
    assert res.exit_code == 0, res.output
    ref = predict(seg[1], [vol], tmp_path / "ref")
    got = tmp_path / "n" / Path(ref.ok[0]["outputs"]["seg"]).name
    assert np.array_equal(_labels(got)[0], _labels(ref.ok[0]["outputs"]["seg"])[0])
    series = REPO / "examples" / "data" / "ct_dicom"
    res = CliRunner().invoke(app, ["predict", f"models:/{NAME}@champion", str(series), "--out",
                                   str(tmp_path / "d"), "--dicom-seg"], env=env)
    assert res.exit_code == 0, res.output
    [seg_file] = list((tmp_path / "d").glob("*_seg.dcm"))
    import highdicom as hd

    dcm = hd.seg.segread(seg_file)  # frames and geometry: tests/deploy/test_dicom_seg.py
    assert {s.SegmentLabel for s in dcm.SegmentSequence} <= {"Anterior", "Posterior"}
    refs = {r.ReferencedSOPInstanceUID for s in dcm.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert len(refs) == len([p for p in series.iterdir() if p.is_file()])


def test_run_folder_outside_the_store_gets_a_new_run(seg, tmp_path: Path) -> None:
    _, out = seg
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    res = register_model(out, "other-seg", alias="staging", tracking_uri=uri)
    assert res.model_uri == "models:/other-seg@staging" and res.version == "1"
    results = json.loads((out / "results.json").read_text())
    assert res.test_metrics == {f"test_{k}": pytest.approx(v) for k, v in results["test_metrics"].items()}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["medssl.kind"] == "register"
    assert client.get_experiment(run.info.experiment_id).name == "medssl-registry"


def test_bad_run_and_classification_model(tmp_path: Path, medmnist_dir: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(MedsslError, match="not-a-run"):
        register_model("not-a-run", "x", tracking_uri=uri)
    res = CliRunner().invoke(app, ["register", str(tmp_path / "missing"), "--name", "x"],
                             env={"MLFLOW_TRACKING_URI": uri})
    assert res.exit_code == 1 and "missing" in res.output
    from tests.deploy._finetuned import finetune_cls

    _, out = finetune_cls(medmnist_dir, tmp_path / "cls")
    with pytest.raises(MedsslError, match="classification"):
        register_model(out, "cls", tracking_uri=uri)
