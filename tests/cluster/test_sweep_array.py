"""A tiny real study as SLURM jobs on the local cluster: ``medssl sweep --slurm`` submits the pretraining and one
array (a task per child, ``afterok``); every run lands under one MLflow parent; ``medssl sweep FILE`` shows the
status while jobs are active, afterwards skips every finished child and closes the parent; ``compare`` works."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.cluster.sweep_jobs import active_jobs
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.compare import DIFF, compare_study
from medssl.tracking.mlflow_tracker import make_client
from tests.cluster._slurm import LocalSlurm, log_tails

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(600)
def test_sweep_as_job_array(slurm_env: LocalSlurm, study_spec: Callable[..., Path], tmp_path: Path) -> None:
    study = study_spec("hippo-array")
    runner = CliRunner()
    emitted = runner.invoke(app, ["sweep", str(study), "--emit-jobs", str(tmp_path / "emitted")])
    assert emitted.exit_code == 0, emitted.output
    script = (tmp_path / "emitted" / "children.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "--child \"$SLURM_ARRAY_TASK_ID\"" in script
    assert "scontrol requeue" in script and "#SBATCH --signal=B:USR1@" in script
    assert "afterok" in (tmp_path / "emitted" / "submit.sh").read_text()
    assert not (tmp_path / "emitted" / "jobs.json").exists()  # written, not submitted

    sub = runner.invoke(app, ["sweep", str(study), "--slurm"])
    assert sub.exit_code == 0, sub.output
    rec = json.loads((tmp_path / "runs" / "hippo-array" / "slurm" / "jobs.json").read_text())
    assert rec["keys"] == ["f100-scratch-s0", "f100-ssl-s0"] and rec["pretrain_job"]
    dep = slurm_env.job_field(rec["children_job"] + "_0", "Dependency") or slurm_env.job_field(
        rec["children_job"], "Dependency")
    assert f"afterok:{rec['pretrain_job']}" in dep
    # while the jobs are active, `medssl sweep FILE` only shows their status (runs nothing here)
    assert active_jobs(study)
    status = runner.invoke(app, ["sweep", str(study)])
    assert status.exit_code == 0 and "SLURM jobs still active" in status.output, status.output
    assert not (tmp_path / "runs" / "hippo-array" / "sweep" / "sweep.json").exists()

    logs = lambda: log_tails(tmp_path / "runs" / "hippo-array" / "slurm" / "logs")  # noqa: E731
    assert slurm_env.wait_job(rec["pretrain_job"], timeout=300) == "COMPLETED", logs()
    assert slurm_env.wait_job(rec["children_job"], timeout=400) == "COMPLETED", logs()
    assert not active_jobs(study)

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = make_client(uri)
    parent = client.get_run(rec["parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    keys = sorted(r.data.tags.get("medssl.sweep_key") for r in kids)
    assert keys == ["f100-scratch-s0", "f100-ssl-s0", "pretrain"]  # one parent: no duplicates, none lost
    assert all(r.info.status == "FINISHED" for r in kids), [(r.data.tags, r.info.status) for r in kids]

    res = run_sweep(study)  # what `medssl sweep FILE` does afterwards: nothing runs again
    assert res.parent_run_id == rec["parent_run_id"]
    assert {c.status for c in res.children} == {"SKIPPED"}
    assert client.get_run(rec["parent_run_id"]).info.status == "FINISHED"
    out = compare_study("hippo-array", tracking_uri=uri)
    assert {(r["fraction"], r["init"]) for r in out.rows} == {(100.0, "scratch"), (100.0, "ssl"), (100.0, DIFF)}


@pytest.mark.timeout(600)
def test_self_training_students_run_after_their_teachers(slurm_env: LocalSlurm, study_spec: Callable[..., Path],
                                                         tmp_path: Path) -> None:
    """The students' array waits for the teachers' (``afterany``), the second round's for the first's; each student
    trains on its teacher's labels."""
    study = study_spec("hippo-st", inits=("scratch",), fractions=(50, 100), self_training={"tta": False, "rounds": 2})
    sub = CliRunner().invoke(app, ["sweep", str(study), "--slurm"])
    assert sub.exit_code == 0, sub.output
    rec = json.loads((tmp_path / "runs" / "hippo-st" / "slurm" / "jobs.json").read_text())
    assert rec["keys"] == ["f50-scratch-s0", "f100-scratch-s0", "f50-scratch+st-s0", "f50-scratch+st2-s0"]
    assert rec["students_from"] == 2 and [(a["round"], a["from"], a["to"]) for a in rec["student_arrays"]] == [
        (1, 2, 2), (2, 3, 3)]
    round2 = rec["student_arrays"][1]["job"]
    for job, task, after in ((rec["students_job"], 2, rec["children_job"]), (round2, 3, rec["students_job"])):
        dep = slurm_env.job_field(f"{job}_{task}", "Dependency") or slurm_env.job_field(job, "Dependency")
        assert f"afterany:{after}" in dep, (job, dep)
    logs = lambda: log_tails(tmp_path / "runs" / "hippo-st" / "slurm" / "logs")  # noqa: E731
    assert slurm_env.wait_job(rec["children_job"], timeout=400) == "COMPLETED", logs()
    assert slurm_env.wait_job(rec["students_job"], timeout=400) == "COMPLETED", logs()
    assert slurm_env.wait_job(round2, timeout=400) == "COMPLETED", logs()
    for key, teacher in (("f50-scratch+st-s0", "f50-scratch-s0"), ("f50-scratch+st2-s0", "f50-scratch+st-s0")):
        student = tmp_path / "runs" / "hippo-st" / "sweep" / key
        manifest = json.loads((student / "pseudo_labels" / "manifest.json").read_text())
        assert manifest["teacher"].endswith(f"{teacher}/checkpoints/best.pt") and manifest["cases"]
    res = run_sweep(study)  # afterwards nothing runs again
    assert {c.status for c in res.children} == {"SKIPPED"}
    out = compare_study("hippo-st", tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert (50.0, "scratch+st-scratch") in out.cells and (50.0, "scratch+st2-scratch") in out.cells
