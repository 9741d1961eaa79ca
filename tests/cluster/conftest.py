"""The ``slurm`` tests' local cluster (:mod:`tests.cluster._slurm`): started once per session, torn down at
the end. ``make test-cluster`` installs Debian's ``slurm-wlm`` + ``munge`` and runs ``pytest -m slurm``;
``make test`` deselects the marker. ``slurm_env`` makes a test a user of that cluster; ``study_spec`` writes the
tiny hippocampus sweep pipelines the tests submit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster._slurm import LocalSlurm, missing_binaries
from tests.engines.studies._helpers import SEG_NET, hippocampus_datalist

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running one-node cluster; ``cluster.env`` holds ``SLURM_CONF`` and what jobs need (``MEDSSL_PYTHON``
    = this interpreter, ``PYTHONPATH`` = the repository, ``MEDSSL_SLURM_DIR``, one OpenMP thread)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge not installed (missing {missing}): run `make test-cluster` as root")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd/slurmctld as root; run the slurm tests as root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.env.update(MEDSSL_PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                       MEDSSL_SLURM_DIR=str(REPO / "docker" / "slurm"), PYTHONUNBUFFERED="1")
    cluster.env.pop("TOY_DELAY_S", None)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster: LocalSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalSlurm:
    """The test process as a user of the cluster: ``SLURM_CONF`` set, one OpenMP thread, working directory
    ``tmp_path`` (what ``medssl sweep --slurm`` records as the jobs' folder). Returns the cluster."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return slurm_cluster


@pytest.fixture
def study_spec(hippocampus_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """A factory of tiny real sweep pipelines on the first ``cases`` hippocampus volumes, written to
    ``tmp_path/<study>.yaml`` (runs under ``tmp_path/runs``, MLflow in ``tmp_path/mlruns.db`` unless ``uri``).

    ``study_spec(study, *, uri=None, experiment="sweep-slurm", cases=6, test_fraction=0.2, val_fraction=0.2,
    inits=("scratch", "ssl"), fractions=(100,), pretrain=None, finetune=None, **extra)``: ``pretrain`` / ``finetune``
    update the sections' defaults (SimCLR 2 steps; SegResNet 1 epoch, batch 2); ``extra``: more pipeline keys.
    """

    def make(study: str, *, uri: str | None = None, experiment: str = "sweep-slurm", cases: int = 6,
             test_fraction: float = 0.2, val_fraction: float = 0.2, inits: tuple[str, ...] = ("scratch", "ssl"),
             fractions: tuple[int, ...] = (100,), pretrain: dict[str, Any] | None = None,
             finetune: dict[str, Any] | None = None, **extra: Any) -> Path:
        datalist = hippocampus_datalist(hippocampus_dir, tmp_path / "data", cases)
        spec = {
            "study": study, "experiment": experiment, "tracking_uri": uri or f"sqlite:///{tmp_path / 'mlruns.db'}",
            "out_dir": str(tmp_path / "runs"),
            "data": {"datalist": str(datalist), "test_fraction": test_fraction, "val_fraction": val_fraction},
            "pretrain": {"method": "simclr", "encoder": "segresnet", "encoder_kwargs": SEG_NET, "roi_size": [16] * 3,
                         "method_kwargs": {"hidden_dim": 8, "out_dim": 4}, "total_steps": 2, "batch_size": 2,
                         "target_spacing": [1.0, 1.0, 1.0], "device": "cpu", "preview": False, **(pretrain or {})},
            "finetune": {"network": "SegResNet", "network_kwargs": SEG_NET, "roi_size": [16] * 3, "max_epochs": 1,
                         "batch_size": 2, "sw_overlap": 0.0, "sw_batch_size": 8, "device": "cpu", **(finetune or {})},
            "fractions": list(fractions), "inits": list(inits), "seeds": [0], "metric": "test_dice_mean", **extra,
        }  # fmt: skip
        path = tmp_path / f"{study}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return make
