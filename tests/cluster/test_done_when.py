"""Issue 11 "done when", end to end on the local SLURM cluster: a tiny study submitted with ``medssl sweep --slurm``
(pretraining + one array) logs into an MLflow server backed by PostgreSQL; one array task is preempted mid-epoch
(``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@T`` sends), requeues itself and resumes; every child is
FINISHED exactly once under one parent, each metric step is logged once, the preempted child's test metric equals
an uninterrupted run's, and ``compare`` shows every cell. Second: where requeue is not allowed (``--no-requeue``),
``docker/slurm/launch.sh`` resubmits the preempted array task (only that task), which resumes and finishes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medssl.cli import app
from medssl.cluster.sweep_jobs import active_jobs, emit_sweep_jobs
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import run_finetune
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.compare import DIFF, compare_study
from medssl.tracking.compare_select import child_runs
from medssl.tracking.mlflow_tracker import make_client
from tests.cluster._slurm import LocalSlurm, log_tails, wait_for
from tests.tracking._pg import PgMlflow, find_pg_bin, start_pg_mlflow

pytestmark = [pytest.mark.slurm, pytest.mark.server]
EPOCHS, VAL_EVERY = 3, 5
_VAL_LINE = re.compile(r"epoch (\d+), step (\d+): val_")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgMlflow]:
    """PostgreSQL + ``mlflow server`` (artifacts in a local folder, proxied by the server: the cheap variant)."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[dev]'")
    srv = start_pg_mlflow(s3=False)
    try:
        yield srv
    finally:
        srv.close()


def _spec(study_spec: Callable[..., Path], study: str, uri: str, inits: list[str], fractions: list[int]) -> Path:
    """~20 training cases, batch 1: 20 steps an epoch, 3 validations inside each."""
    return study_spec(study, uri=uri, experiment="done-when", cases=26, test_fraction=0.12, val_fraction=0.12,
                      inits=tuple(inits), fractions=tuple(fractions),
                      finetune={"max_epochs": EPOCHS, "batch_size": 1, "num_samples": 1, "val_every_steps": VAL_EVERY})


def _epoch_of(last: Path) -> int:
    try:
        return int(load_checkpoint(last)["epoch"]) if last.is_file() else -1
    except Exception:  # noqa: BLE001 - a checkpoint being written: ask again
        return -1


def _preempt_mid_epoch(cluster: LocalSlurm, task: str, child_dir: Path, log: Path) -> int:
    """Signal ``task`` once its child validated inside epoch 1 (after the epoch-0 ``last.pt``): the resumed job
    redoes those steps, the case that could log a metric step twice. Returns the step seen validated."""
    text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
    wait_for(lambda: _epoch_of(child_dir / "checkpoints" / "last.pt") >= 1, 300,
          lambda: f"{child_dir} wrote no epoch-end checkpoint\n{text()[-3000:]}")
    steps = wait_for(lambda: [int(s) for e, s in _VAL_LINE.findall(text()) if e == "1"], 120,
                  lambda: f"no validation inside epoch 1\n{text()[-3000:]}")
    cluster.run("scancel", "--signal=USR1", "--batch", task)
    return max(steps)  # type: ignore[arg-type]


def _check_children(client, parent_id: str, want: list[str], study_root: Path) -> dict:
    """Every child FINISHED exactly once under the parent; each metric step once, equal to the local history."""
    kids = child_runs(client, client.get_run(parent_id))
    assert sorted(r.data.tags.get("medssl.sweep_key") for r in kids) == sorted(want), [
        (r.data.tags.get("medssl.sweep_key"), r.info.status) for r in kids]
    assert all(r.info.status == "FINISHED" for r in kids), [(r.data.tags, r.info.status) for r in kids]
    by_key = {r.data.tags["medssl.sweep_key"]: r for r in kids}
    for key, run in by_key.items():
        if key == "pretrain":
            continue
        out = study_root / "sweep" / key
        history = load_checkpoint(out / "checkpoints" / "last.pt")["history"]
        for name in run.data.metrics:
            remote = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            steps = [s for s, _ in remote]
            assert len(steps) == len(set(steps)), (key, name, sorted(steps))  # no step logged twice
            local = sorted((int(h["step"]), float(h[name])) for h in history if name in h)
            if local:  # nothing lost: exactly the steps of the run's own history (val_*, train_loss, lr), same values
                assert sorted(steps) == [s for s, _ in local], (key, name)
                assert [v for _, v in sorted(remote)] == pytest.approx([v for _, v in local], nan_ok=True)
        results = json.loads((out / "results.json").read_text())
        for name, value in results["test_metrics"].items():
            got = [m.value for m in client.get_metric_history(run.info.run_id, f"test_{name}")]
            assert got == pytest.approx([value], nan_ok=True), (key, name)
    return by_key


@pytest.mark.timeout(900)
def test_study_array_preempted_requeued_on_postgres_server(
    slurm_env: LocalSlurm, pg_server: PgMlflow, study_spec: Callable[..., Path], tmp_path: Path
) -> None:
    study = _spec(study_spec, "hippo-done", pg_server.uri, ["scratch", "ssl"], [100])
    root = tmp_path / "runs" / "hippo-done"
    sub = CliRunner().invoke(app, ["sweep", str(study), "--slurm"])
    assert sub.exit_code == 0, sub.output
    rec = json.loads((root / "slurm" / "jobs.json").read_text())
    assert rec["keys"] == ["f100-scratch-s0", "f100-ssl-s0"] and rec["pretrain_job"]
    logs = root / "slurm" / "logs"
    all_logs = lambda: log_tails(logs)  # noqa: E731
    # task 1 (the SSL child) started last: it holds the array's own job id, so requeueing "$SLURM_JOB_ID" would
    # requeue the whole array; launch.sh requeues <array>_<task>
    task, other = f"{rec['children_job']}_1", f"{rec['children_job']}_0"
    task_log = logs / f"hippo-done-{rec['children_job']}_1.out"

    seen = _preempt_mid_epoch(slurm_env, task, root / "sweep" / "f100-ssl-s0", task_log)
    assert slurm_env.job_field(task, "JobId") == rec["children_job"]
    slurm_env.start_requeued(task)  # requeued: same job id, Restarts 1
    assert slurm_env.wait_job(rec["children_job"], timeout=420) == "COMPLETED", all_logs()
    assert slurm_env.wait_job(rec["pretrain_job"], timeout=10) == "COMPLETED", all_logs()
    text = task_log.read_text()
    assert f"restart 0); requeueing {task}" in text and "preempted by SIGUSR1" in text, text[-3000:]
    assert slurm_env.job_field(other, "Restarts") == "0"  # the other task ran once
    resumed = re.search(r"resumed at epoch (\d+) \(step (\d+)\)", text)
    assert resumed and int(resumed.group(1)) >= 1, text[-3000:]  # from an epoch-end checkpoint: steps redone
    assert seen > int(resumed.group(2))  # a validation after that checkpoint was logged before the signal

    client = make_client(pg_server.uri)
    by_key = _check_children(client, rec["parent_run_id"], ["f100-scratch-s0", "f100-ssl-s0", "pretrain"], root)
    assert by_key["f100-ssl-s0"].data.tags.get("medssl.preempted")  # the interrupted attempt left its mark
    assert not by_key["f100-scratch-s0"].data.tags.get("medssl.preempted")

    # the preempted child equals the same child run without interruption (in process, no tracking)
    out = root / "sweep" / "f100-ssl-s0"
    cfg = dataclasses.replace(FinetuneConfig.from_yaml(out / "config.yaml"), out_dir=str(tmp_path / "reference"),
                              experiment=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job ran (OMP_NUM_THREADS=1)
    try:
        ref = run_finetune(cfg, progress=False, preemption=False)
    finally:
        torch.set_num_threads(threads)
    got = json.loads((out / "results.json").read_text())["test_metrics"]
    assert got == pytest.approx(ref.test_metrics, abs=1e-6, nan_ok=True)

    res = run_sweep(study)  # `medssl sweep FILE` afterwards: nothing runs again, the parent is closed
    assert res.parent_run_id == rec["parent_run_id"] and {c.status for c in res.children} == {"SKIPPED"}
    assert client.get_run(rec["parent_run_id"]).info.status == "FINISHED"
    cmp = compare_study("hippo-done", tracking_uri=pg_server.uri)
    assert {(r["fraction"], r["init"]) for r in cmp.rows} == {(100.0, "scratch"), (100.0, "ssl"), (100.0, DIFF)}
    row = next(r for r in cmp.rows if r["init"] == "ssl")
    assert row["mean"] == pytest.approx(ref.test_metrics["dice_mean"], abs=1e-6)


@pytest.mark.timeout(600)
def test_no_requeue_resubmits_only_the_preempted_task(
    slurm_env: LocalSlurm, pg_server: PgMlflow, study_spec: Callable[..., Path], tmp_path: Path
) -> None:
    study = _spec(study_spec, "hippo-resubmit", pg_server.uri, ["scratch"], [50, 100])
    root = tmp_path / "runs" / "hippo-resubmit"
    jobs = emit_sweep_jobs(study, submit=True, sbatch_options=["--no-requeue"])  # scontrol requeue is refused
    assert jobs.pretrain_job is None and jobs.keys == ["f50-scratch-s0", "f100-scratch-s0"]
    array, logs = jobs.children_job, root / "slurm" / "logs"
    all_logs = lambda: log_tails(logs)  # noqa: E731
    old_log = logs / f"hippo-resubmit-{array}_1.out"

    _preempt_mid_epoch(slurm_env, f"{array}_1", root / "sweep" / "f100-scratch-s0", old_log)
    found = wait_for(lambda: re.search(r"Submitted batch job (\d+)", old_log.read_text()), 120, lambda: all_logs())
    new = found.group(1)  # type: ignore[union-attr]
    assert slurm_env.job_field(new, "ArrayTaskId") == "1", slurm_env.run("scontrol", "show", "job", new).stdout
    assert slurm_env.wait_job(array, timeout=300, states=("COMPLETED", "FAILED")) in ("COMPLETED", "FAILED")
    assert slurm_env.job_field(f"{array}_1", "ExitCode") == "75:0"  # stopped for preemption, continued as `new`
    assert slurm_env.job_field(f"{array}_1", "Restarts") == "0" == slurm_env.job_field(f"{array}_1", "Requeue")
    if slurm_env.job_state(new) in ("PENDING", "RUNNING"):
        assert any(j.startswith(new) for j in active_jobs(study)), "medssl sweep FILE must see the resubmitted job"
    assert slurm_env.wait_job(new, timeout=300) == "COMPLETED", all_logs()
    text = old_log.read_text()
    assert f"requeueing {array}_1" in text and "Requested operation is presently disabled" in text, text[-3000:]
    new_text = (logs / f"hippo-resubmit-{new}_1.out").read_text()
    assert re.search(r"resumed at epoch [1-9]", new_text), new_text[-3000:]

    client = make_client(pg_server.uri)
    _check_children(client, jobs.parent_run_id, ["f50-scratch-s0", "f100-scratch-s0"], root)
    res = run_sweep(study)
    assert {c.status for c in res.children} == {"SKIPPED"}
    assert client.get_run(jobs.parent_run_id).info.status == "FINISHED"
