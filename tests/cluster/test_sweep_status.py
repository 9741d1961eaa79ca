"""``medssl sweep FILE`` status of a submitted sweep without a cluster: a fake ``squeue`` on ``PATH`` shows the
pretraining resubmitted twice (jobs 12 → 20 → 21, launch.sh moved the array's dependency to 21) and the array's
task 1 resubmitted as 30_1; :func:`status_table` follows both chains by job name, shows what the pending tasks wait
on, and :func:`active_jobs` lists the active jobs. The real cluster's version is ``test_resubmit_chain.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from medssl.cluster.sweep_jobs import active_jobs, status_table

# squeue -h -r -o "%i|%T|%j|%r|%E", by id (-j 12,13) and by name (-n study,study-pretrain): the same lines
SQUEUE = """\
21|RUNNING|chain-pretrain|None|(null)
13_0|PENDING|chain|Dependency|afterok:21(unfulfilled)
30_1|PENDING|chain|None|(null)
"""


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "squeue.out").write_text(SQUEUE)
    (bin_dir / "squeue").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls"}\n'
                                    f'cat {tmp_path / "squeue.out"}\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = tmp_path / "runs" / "chain" / "slurm"
    slurm.mkdir(parents=True)
    (slurm / "jobs.json").write_text(json.dumps({"study": "chain", "parent_run_id": "p1", "pretrain_job": "12",
                                                "children_job": "13", "keys": ["f100-scratch-s0", "f100-ssl-s0"]}))
    return {"study": "chain", "out_dir": str(tmp_path / "runs"), "data": {"datalist": "unused.json"},
            "finetune": {}, "pretrain": {"method": "simclr"}, "fractions": [100], "seeds": [0],
            "inits": ["scratch", "ssl"]}


def _render(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_status_follows_resubmitted_jobs(pipeline: dict, tmp_path: Path) -> None:
    text = _render(status_table(pipeline))
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[3:5]]
            for line in text.splitlines() if line.count("│") >= 5}
    assert rows["pretrain"] == ["21 (resubmitted from 12)", "RUNNING"], text
    assert rows["f100-scratch-s0"] == ["13_0", "PENDING (Dependency: afterok:21(unfulfilled))"], text
    assert rows["f100-ssl-s0"] == ["30_1 (resubmitted from 13_1)", "PENDING"], text
    calls = (tmp_path / "calls").read_text()
    assert "-j 12,13" in calls and "-n chain,chain-pretrain" in calls


def test_active_jobs_include_resubmissions(pipeline: dict) -> None:
    assert active_jobs(pipeline) == {"21": "RUNNING", "13_0": "PENDING", "30_1": "PENDING"}


def test_done_jobs_show_done(pipeline: dict, tmp_path: Path) -> None:
    (tmp_path / "squeue.out").write_text("")  # nothing pending or running any more
    assert active_jobs(pipeline) == {}
    text = _render(status_table(pipeline))
    assert text.count(" done ") == 3 and "resubmitted" not in text, text
