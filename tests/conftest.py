"""Shared fixtures: the real datasets beside the checkout, else the sample shipped in ``examples/data``.

Resolution (the developers' guide rule): ``$MEDSSL_DATASETS`` where it is a folder, else ``../shared/datasets``
(beside the checkout), else ``shared/datasets`` inside it. Where none exists (a user's fresh clone) the datasets
that have a shipped sample fall back to it instead of skipping: ``hippocampus_dir`` →
``examples/data/hippocampus`` (40 labelled cases, same ``imagesTr``/``labelsTr`` layout), ``ct_dicom_dir`` →
``examples/data/ct_dicom`` (the TotalSegmentator example CT series). The others (``totalseg_dir``'s NIfTI files,
``ge_head_dir``, ``medmnist_dir``) have no sample and skip, naming what is missing. ``MEDSSL_NO_SHARED=1``
ignores the shared datasets (and ``$MEDSSL_DATASETS``) to run the suite as a fresh clone would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data"
NO_SHARED_ENV = "MEDSSL_NO_SHARED"


def _no_shared() -> bool:
    """Whether ``$MEDSSL_NO_SHARED`` forces the fresh-clone view (any value but empty, ``0``, ``false``, ``no``)."""
    return os.environ.get(NO_SHARED_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _find_datasets() -> Path | None:
    """The shared datasets folder, or ``None`` where absent or ignored (``MEDSSL_NO_SHARED=1``)."""
    if _no_shared():
        return None
    env = os.environ.get("MEDSSL_DATASETS")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO / "shared" / "datasets"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _absent(what: str) -> str:
    why = f"{NO_SHARED_ENV} is set" if _no_shared() else "shared datasets not found (set MEDSSL_DATASETS)"
    return f"{what}: {why}"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """``../shared/datasets`` (or ``$MEDSSL_DATASETS``); skips the test where it is absent: no sample stands
    in for the whole folder."""
    d = _find_datasets()
    if d is None:
        pytest.skip(_absent("the shared datasets folder"))
    return d


def _dataset(name: str, needs: str) -> Path:
    """``<datasets>/<name>``; skips, naming the dataset and what the test needed from it, where absent."""
    d = _find_datasets()
    if d is None:
        pytest.skip(_absent(f"dataset {name} ({needs}; no shipped sample)"))
    p = d / name
    if not p.exists():
        pytest.skip(f"dataset {name} ({needs}) not present under {d}")
    return p


def hippocampus_source() -> Path | None:
    """The MSD Task04 hippocampus folder the tests use: the shared copy (200 labelled cases) where present, else
    ``examples/data/hippocampus`` (40); ``None`` where neither holds an ``imagesTr`` folder."""
    d = _find_datasets()
    for c in ([d / "msd_task04_hippocampus"] if d else []) + [SAMPLE / "hippocampus"]:
        if (c / "imagesTr").is_dir() and (c / "labelsTr").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """MSD Task04 hippocampus in MSD layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``): the shared copy, or
    the shipped 40-case sample where the shared datasets are absent."""
    p = hippocampus_source()
    if p is None:
        pytest.skip("no hippocampus data: neither the shared msd_task04_hippocampus nor examples/data/hippocampus")
    return p


@pytest.fixture(scope="session")
def hippocampus_cases(hippocampus_dir: Path) -> int:
    """How many labelled cases ``hippocampus_dir`` holds by its ``dataset.json`` (``numTraining``: 200 shared,
    40 sample): the count that tests check the files and the ingest against."""
    return int(json.loads((hippocampus_dir / "dataset.json").read_text())["numTraining"])


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """The TotalSegmentator example files (NIfTI CT/MR/segmentations, ``class_map.json``, the DICOM series).
    Only its DICOM series ships as a sample: tests of that series alone take ``ct_dicom_dir``."""
    return _dataset("totalsegmentator_example", "its NIfTI files, not only the DICOM series in examples/data")


@pytest.fixture(scope="session")
def ct_dicom_dir() -> Path:
    """The TotalSegmentator example CT DICOM series (20 JPEG 2000 slices): the shared copy, else the
    byte-identical ``examples/data/ct_dicom``."""
    d = _find_datasets()
    for c in ([d / "totalsegmentator_example" / "example_ct_dicom"] if d else []) + [SAMPLE / "ct_dicom"]:
        if c.is_dir():
            return c
    pytest.skip("no CT DICOM series: neither the shared totalsegmentator_example nor examples/data/ct_dicom")


@pytest.fixture(scope="session")
def ge_head_dir() -> Path:
    return _dataset("dcm_qa_ct_ge_head", "the tilted GE head CT series")


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    return _dataset("medmnist3d", "AdrenalMNIST3D archives")


@pytest.fixture(autouse=True, scope="session")
def _no_mlflow_store_in_the_checkout(tmp_path_factory: pytest.TempPathFactory):
    """A test that reaches MLflow without naming a store writes into a session temp store, never into the
    checkout (MLflow's own default is ``./mlflow.db``); tests of the default delete the variable themselves."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow_default')}/mlflow.db"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
