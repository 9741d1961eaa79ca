"""Shared fixtures: the real datasets beside the checkout, skipped cleanly where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_datasets() -> Path | None:
    env = os.environ.get("MEDSSL_DATASETS")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "datasets", REPO / "shared" / "datasets"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """``../shared/datasets`` (or ``$MEDSSL_DATASETS``); skips the test where it is absent."""
    d = _find_datasets()
    if d is None:
        pytest.skip("shared datasets not found (set MEDSSL_DATASETS)")
    return d


def _dataset(datasets_dir: Path, name: str) -> Path:
    p = datasets_dir / name
    if not p.exists():
        pytest.skip(f"dataset {name} not present under {datasets_dir}")
    return p


@pytest.fixture(scope="session")
def hippocampus_dir(datasets_dir: Path) -> Path:
    return _dataset(datasets_dir, "msd_task04_hippocampus")


@pytest.fixture(scope="session")
def totalseg_dir(datasets_dir: Path) -> Path:
    return _dataset(datasets_dir, "totalsegmentator_example")


@pytest.fixture(scope="session")
def ge_head_dir(datasets_dir: Path) -> Path:
    return _dataset(datasets_dir, "dcm_qa_ct_ge_head")


@pytest.fixture(scope="session")
def medmnist_dir(datasets_dir: Path) -> Path:
    return _dataset(datasets_dir, "medmnist3d")


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
