"""Issue 11: a spool left by a dead job is replayed by the next command that touches it — ``medssl runs sync``
and ``medssl sweep`` (resume) — not only by the same run's resume. Real PostgreSQL + ``mlflow server``, stopped
during the job's outage and restarted after it was killed; every metric arrives exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.mlflow_tracker import make_client
from medssl.tracking.spool import find_spools, replay_spools
from tests.engines.studies.test_sweep import FakeFinetune, children
from tests.tracking._pg import PgMlflow

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

# A job that logs to the server, then — the server down — spools metrics, a tag, a param and an artifact,
# and hangs until it is SIGKILLed (never closed: its records exist only in the spool).
DEAD_JOB = """
import sys, time
from pathlib import Path
from medssl.tracking.mlflow_tracker import MlflowTracker
uri, out = sys.argv[1], Path(sys.argv[2])
tr = MlflowTracker("spool-replay", run_name="dead-job", tracking_uri=uri, spool_path=out / "mlflow_spool.jsonl",
                   flush_every_s=0.0, backoff_s=0.1, max_backoff_s=0.2)
tr.log_params({"lr": 0.1, "seed": 3})
for s in range(5):
    tr.log_metrics({"loss": 1.0 / (s + 1), "acc": s / 10}, s)
assert tr.flush()
(out / "run_id").write_text(tr.run_id)
while not (out / "go").exists():
    time.sleep(0.1)
for s in range(5, 10):
    tr.log_metrics({"loss": 1.0 / (s + 1), "acc": s / 10}, s)
tr.set_tags({"phase": "outage"})
(out / "model.txt").write_text("weights")
tr.log_artifact(out / "model.txt", "outputs")
tr.log_params({"late": "yes"})
(out / "spooled").touch()
time.sleep(600)
"""

# A sweep of two children: the first finishes during the outage (its last epoch, test metrics and end status
# spooled; its local marker says FINISHED, so a resume skips it), then the job dies in the second.
DEAD_SWEEP = """
import json, sys, time
from pathlib import Path
from medssl.engines.studies.sweep import run_sweep
from tests.engines.studies.test_sweep import FakeFinetune, pipeline
tmp, uri = Path(sys.argv[1]), sys.argv[2]
spec = pipeline(tmp, uri, study="dead", fractions=[100], seeds=[0, 1], inits=["scratch"])
(tmp / "spec.json").write_text(json.dumps(spec))
ft = FakeFinetune(flush_every_s=0.0, backoff_s=0.1, max_backoff_s=0.2, close_timeout_s=1.0)
def on_epoch(key, epoch):
    if key == "f100-scratch-s0" and epoch == 1:
        (tmp / "ready").touch()
        while not (tmp / "go").exists():
            time.sleep(0.1)
ft.on_epoch = on_epoch
def finetune(cfg, **kw):
    if cfg.tags["medssl.sweep_key"] != "f100-scratch-s0":
        (tmp / "second").touch()
        time.sleep(600)
    return ft(cfg, **kw)
run_sweep(spec, finetune_fn=finetune)
"""


def _spawn(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} not reached within {timeout_s} s")
        time.sleep(0.2)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_runs_sync_replays_a_killed_jobs_spool_exactly_once(pg_mlflow: PgMlflow, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    proc = _spawn(DEAD_JOB, pg_mlflow.uri, str(job))
    try:
        _wait_for(job / "run_id", proc)
        pg_mlflow.stop()  # outage: mlflow server and PostgreSQL both down
        (job / "go").touch()
        _wait_for(job / "spooled", proc)
        spool = job / "mlflow_spool.jsonl"
        records = [json.loads(line) for line in spool.read_text().splitlines()]
        assert len(records) == 13 and {r["uri"] for r in records} == {pg_mlflow.uri}
        # the job is alive: its spool is its own, no other command replays it
        live = replay_spools([job])
        assert live.busy == [spool.resolve()] and not live.sent and not live.failed
    finally:
        _kill(proc)  # the job dies with its records only on disk
    pg_mlflow.start()
    run_id = (job / "run_id").read_text()
    # a replay that was killed after sending but before removing its file: the same records are sent twice
    (tmp_path / "again").mkdir()
    shutil.copy(spool, tmp_path / "again" / "mlflow_spool.jsonl")
    runner = CliRunner()
    res = runner.invoke(app, ["runs", "sync", str(job), str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert "sent 26 record(s) from 2 spool(s)" in " ".join(res.output.split())
    client = make_client(pg_mlflow.uri)
    for key in ("loss", "acc"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(10)), key  # none lost, none twice
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == {
        s: 1.0 / (s + 1) for s in range(10)
    }
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "seed": "3", "late": "yes"}
    assert run.data.tags["phase"] == "outage"
    assert [f.path for f in client.list_artifacts(run_id, "outputs")] == ["outputs/model.txt"]
    if pg_mlflow.s3_endpoint:  # the proxied upload really landed in the S3-compatible store
        import boto3

        s3 = boto3.client("s3", endpoint_url=pg_mlflow.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
        assert any(k.endswith(f"{run_id}/artifacts/outputs/model.txt") for k in keys), keys
    assert find_spools([tmp_path]) == [] and not list(job.glob("*.lock"))
    res = runner.invoke(app, ["runs", "sync", str(tmp_path)])  # nothing left: a no-op
    assert res.exit_code == 0 and "sent 0 record(s) from 0 spool(s)" in " ".join(res.output.split())


def test_sync_with_the_server_down_keeps_the_spool(tmp_path: Path) -> None:
    spool = tmp_path / "run" / "mlflow_spool.jsonl"
    spool.parent.mkdir()
    rec = {"run_id": "0" * 32, "uri": "http://127.0.0.1:9", "type": "metric", "key": "x", "value": 1.0,
           "step": 0, "ts": 1}
    spool.write_text(json.dumps(rec) + "\n")
    res = CliRunner().invoke(app, ["runs", "sync", str(tmp_path)])
    assert res.exit_code == 1 and str(spool.resolve()) in " ".join(res.output.split())
    assert spool.read_text() == json.dumps(rec) + "\n"


def test_sweep_resume_replays_the_spool_of_a_child_it_skips(pg_mlflow: PgMlflow, tmp_path: Path) -> None:
    proc = _spawn(DEAD_SWEEP, str(tmp_path), pg_mlflow.uri)
    try:
        _wait_for(tmp_path / "ready", proc)
        pg_mlflow.stop()
        (tmp_path / "go").touch()
        _wait_for(tmp_path / "second", proc)
    finally:
        _kill(proc)
    s0 = tmp_path / "runs" / "dead" / "sweep" / "f100-scratch-s0"
    marker = json.loads((s0 / "sweep_child.json").read_text())
    assert marker["status"] == "FINISHED"  # a resume skips it: only a replay can deliver its records
    kinds = [json.loads(x)["type"] for x in (s0 / "mlflow_spool.jsonl").read_text().splitlines()]
    assert kinds.count("status") == 1 and kinds.count("metric") == 5  # epoch 2 (x2) + 3 test metrics
    pg_mlflow.start()
    spec = json.loads((tmp_path / "spec.json").read_text())
    ft = FakeFinetune(flush_every_s=0.0)
    res = run_sweep(spec, finetune_fn=ft)
    assert [c.status for c in res.children] == ["SKIPPED", "FINISHED"] and ft.calls == [("f100-scratch-s1", "auto")]
    client = make_client(pg_mlflow.uri)
    runs = {r.data.tags["medssl.sweep_key"]: r for r in children(pg_mlflow.uri, res.parent_run_id)}
    assert set(runs) == {"f100-scratch-s0", "f100-scratch-s1"}
    for key, run in runs.items():
        assert run.info.status == "FINISHED", key
        for name in ("val_dice_mean", "train_loss"):
            assert _steps(client, run.info.run_id, name) == [0, 1, 2], (key, name)
        for name in ("test_dice_mean", "test_dice_1", "test_dice_2"):
            assert _steps(client, run.info.run_id, name) == [3], (key, name)
    assert run_sweep(spec, finetune_fn=ft).children[0].status == "SKIPPED"
    assert find_spools([tmp_path]) == []
