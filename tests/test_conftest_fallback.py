"""tests/conftest.py: the dataset fixtures resolve to the shared datasets where present and fall back to the
sample shipped in ``examples/data`` where not (``MEDSSL_NO_SHARED=1`` forces that), the datasets without a
sample skip naming what is missing, and ``$MEDSSL_DATASETS`` still picks the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NO_SHARED_ENV, REPO, SAMPLE, _find_datasets, hippocampus_source

REPORT_ENV = "MEDSSL_FIXTURE_REPORT"
FIXTURES = ["hippocampus_dir", "hippocampus_cases", "ct_dicom_dir", "totalseg_dir", "ge_head_dir", "medmnist_dir",
            "datasets_dir"]


@pytest.mark.skipif(REPORT_ENV not in os.environ, reason=f"the inner run of the tests below (sets {REPORT_ENV})")
def test_inner_report_of_the_fixtures(request: pytest.FixtureRequest) -> None:
    """Writes what each dataset fixture gives in this pytest session: a value, or the reason it skipped."""
    report: dict[str, Any] = {}
    for name in FIXTURES:
        try:
            value = request.getfixturevalue(name)
            report[name] = {"value": str(value) if isinstance(value, Path) else value}
        except pytest.skip.Exception as e:
            report[name] = {"skip": str(e.msg)}
    Path(os.environ[REPORT_ENV]).write_text(json.dumps(report))


def _fixtures_in_a_fresh_session(tmp_path: Path, **env: str) -> dict[str, dict[str, Any]]:
    """The fixtures' values in a separate pytest process run with ``env`` (MEDSSL_* variables replaced)."""
    out = tmp_path / "report.json"
    base = {k: v for k, v in os.environ.items() if k not in (NO_SHARED_ENV, "MEDSSL_DATASETS")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__).relative_to(REPO)}::test_inner_report_of_the_fixtures"],
        cwd=REPO, env=base | {REPORT_ENV: str(out), **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_forced_fallback_gives_the_shipped_sample(tmp_path: Path) -> None:
    got = _fixtures_in_a_fresh_session(tmp_path, **{NO_SHARED_ENV: "1", "MEDSSL_DATASETS": str(tmp_path)})
    assert got["hippocampus_dir"] == {"value": str(SAMPLE / "hippocampus")}
    assert got["hippocampus_cases"] == {"value": 40}  # examples/data/README.md: 40 labelled cases
    assert got["ct_dicom_dir"] == {"value": str(SAMPLE / "ct_dicom")}
    for name, what in [("totalseg_dir", "totalsegmentator_example"), ("ge_head_dir", "dcm_qa_ct_ge_head"),
                       ("medmnist_dir", "medmnist3d"), ("datasets_dir", "shared datasets")]:
        assert "skip" in got[name] and what in got[name]["skip"] and NO_SHARED_ENV in got[name]["skip"], got[name]


def test_shared_datasets_are_used_where_present(tmp_path: Path) -> None:
    shared = _find_datasets() if os.environ.get(NO_SHARED_ENV) is None else None
    if shared is None or not (shared / "msd_task04_hippocampus" / "imagesTr").is_dir():
        pytest.skip("shared msd_task04_hippocampus not found (or MEDSSL_NO_SHARED set): nothing to resolve to")
    got = _fixtures_in_a_fresh_session(tmp_path, **{"MEDSSL_DATASETS": str(shared)})
    hippo = shared / "msd_task04_hippocampus"
    assert got["hippocampus_dir"] == {"value": str(hippo)} and got["datasets_dir"] == {"value": str(shared)}
    assert got["hippocampus_cases"] == {"value": 200}  # its SOURCE.txt: 200 image/label pairs
    assert len(list((hippo / "imagesTr").glob("*.nii.gz"))) == 200
    series = shared / "totalsegmentator_example" / "example_ct_dicom"
    if series.is_dir():
        assert got["ct_dicom_dir"] == {"value": str(series)}
    # the sample's labelled cases are byte-identical copies of shared ones (examples/data/README.md)
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((SAMPLE / "hippocampus" / sub).glob("*.nii.gz")):
            assert f.read_bytes() == (hippo / sub / f.name).read_bytes(), f


def test_medssl_datasets_picks_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "datasets"
    (own / "msd_task04_hippocampus").mkdir(parents=True)
    monkeypatch.delenv(NO_SHARED_ENV, raising=False)
    monkeypatch.setenv("MEDSSL_DATASETS", str(own))
    assert _find_datasets() == own
    assert hippocampus_source() == SAMPLE / "hippocampus"  # no imagesTr/labelsTr there: the sample
    for sub in ("imagesTr", "labelsTr"):
        (own / "msd_task04_hippocampus" / sub).mkdir()
    assert hippocampus_source() == own / "msd_task04_hippocampus"
    for off in ("1", "yes", "true"):
        monkeypatch.setenv(NO_SHARED_ENV, off)
        assert _find_datasets() is None and hippocampus_source() == SAMPLE / "hippocampus"
    for on in ("", "0", "false", "no"):
        monkeypatch.setenv(NO_SHARED_ENV, on)
        assert _find_datasets() == own
