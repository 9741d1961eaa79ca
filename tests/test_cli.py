from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from medssl.cli import app

runner = CliRunner()


def _nii(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_ingest_exit_codes_success_partial_failure(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(2):
        _nii(src / f"v{i}.nii.gz", rng.normal(size=(8, 9, 10)).astype(np.float32))
    ok = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o1"), "--salt", "x"])
    assert ok.exit_code == 0, ok.output
    assert "unlabeled" in ok.output and "2" in ok.output

    (src / "broken.nii.gz").write_bytes(b"")
    partial = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o2"), "--salt", "x"])
    assert partial.exit_code == 3, partial.output
    assert "empty_file" in partial.output

    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")])
    assert missing.exit_code == 1
    assert "no such file" in missing.output
    assert "Traceback" not in missing.output


def test_bad_option_value_is_one_clear_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _nii(src / "v.nii.gz", np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32))
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--tilt", "sideways"])
    assert res.exit_code == 1
    assert "tilt='sideways'" in res.output


def test_version() -> None:
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0 and "medssl" in res.output and "monai" in res.output


def test_pretrain_command_runs_and_reports(tmp_path: Path) -> None:
    import json

    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        _nii(tmp_path / f"u{i}.nii.gz", rng.normal(size=(20, 22, 18)).astype(np.float32))
        items.append({"image": f"u{i}.nii.gz", "case_id": f"c{i}"})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": [], "unlabeled": items}))
    out = tmp_path / "run"
    res = runner.invoke(app, ["pretrain", "--datalist", str(dl), "--method", "simclr", "--encoder", "segresnet",
                              "--out", str(out), "--steps", "2", "--batch-size", "2", "--roi", "16,16,16",
                              "--device", "cpu", "--set", "encoder_kwargs.init_filters=8", "--set", "experiment=null",
                              "--set", "warmup_steps=0"])
    assert res.exit_code == 0, res.output
    assert "final loss" in res.output and (out / "encoder.pt").is_file()
    # resuming with another method is refused, naming both
    bad = runner.invoke(app, ["pretrain", "--datalist", str(dl), "--method", "vicreg", "--encoder", "segresnet",
                              "--out", str(tmp_path / "run2"), "--steps", "3", "--batch-size", "2", "--roi",
                              "16,16,16", "--device", "cpu", "--set", "encoder_kwargs.init_filters=8",
                              "--set", "experiment=null", "--resume", str(out / "checkpoints" / "last.pt")])
    assert bad.exit_code == 1, bad.output
    assert "simclr" in bad.output and "vicreg" in bad.output


def test_finetune_and_sweep_errors_are_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["finetune", "--fraction", "10", "--init", "scratch"])
    assert res.exit_code == 1 and "--datalist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sweep", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "missing.yaml" in res.output
    res = runner.invoke(app, ["compare", "--study", "no-such-study", "--tracking-uri",
                              f"sqlite:///{tmp_path / 'm.db'}"])
    assert res.exit_code == 1 and "no-such-study" in res.output
