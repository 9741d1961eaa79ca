"""The ``slurm`` tests' local cluster (:mod:`tests.cluster._slurm`): started once per session, torn down at
the end. ``make test-cluster`` installs Debian's ``slurm-wlm`` + ``munge`` and runs ``pytest -m slurm``;
``make test`` deselects the marker."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster._slurm import LocalSlurm, missing_binaries

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
