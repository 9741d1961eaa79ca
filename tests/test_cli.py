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
