"""Issue 5: a tiny sweep against a real ``mlflow server``; the server dies mid-sweep and comes back after a
few seconds; the sweep completes and no metric is lost (the trackers buffer, spool and retry)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from medssl.engines.sweep import run_sweep
from medssl.tracking.compare import compare_study
from medssl.tracking.mlflow_tracker import make_client
from tests.test_sweep import FakeFinetune, FakePretrain, children, fresh_sqlite_uri, pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp: Path, port: int, db_uri: str) -> subprocess.Popen | None:
    """``mlflow server`` on 127.0.0.1 in its own process group; ``None`` if not healthy within 40 s."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        mlflow,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        db_uri,
        "--default-artifact-root",
        str(tmp / "art"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: starts ~2x faster
    proc = subprocess.Popen(
        cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    _stop(proc)
    return None


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)  # the server's own group: gunicorn/uvicorn workers included
    proc.wait(timeout=20)


@pytest.mark.timeout(120)
def test_sweep_survives_server_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    db_uri = fresh_sqlite_uri(tmp_path / "server")
    servers = [_start_server(tmp_path, port, db_uri)]
    if servers[0] is None:
        pytest.skip("mlflow server did not start within 40 s")
    outage: dict[str, object] = {}
    victim = "f100-scratch-s1"  # third child: the parent and two children exist already

    def on_epoch(key: str, epoch: int) -> None:
        if key == victim and epoch == 0:
            _stop(servers[-1], signal.SIGKILL)  # the server dies mid-run
            outage["down_at"] = time.monotonic()

            def restart() -> None:
                time.sleep(2.0)
                servers.append(_start_server(tmp_path, port, db_uri))
                outage["up_at"] = time.monotonic()

            threading.Thread(target=restart, daemon=True).start()
        if key == victim and epoch == 1:  # logging during the outage neither raises nor blocks; it spools
            outage["spooled"] = any(Path(tmp_path / "runs").rglob("mlflow_spool.jsonl"))

    ft = FakeFinetune(flush_every_s=0.0, backoff_s=0.2, max_backoff_s=1.0, close_timeout_s=60)
    ft.on_epoch = on_epoch
    spec = pipeline(tmp_path, uri, study="outage", fractions=[100], seeds=[0, 1], inits=["scratch", "ssl"])
    try:
        res = run_sweep(spec, finetune_fn=ft, pretrain_fn=FakePretrain())
        assert "up_at" in outage and outage.get("spooled") is True, outage
        assert servers[-1] is not None
        assert not res.failed and len(res.children) == 4
        client = make_client(uri)
        runs = children(uri, res.parent_run_id)
        finetune_runs = [r for r in runs if r.data.tags.get("medssl.kind") == "finetune"]
        assert len(finetune_runs) == 4
        for run in finetune_runs:  # every metric of every child is there exactly once
            assert run.info.status == "FINISHED"
            for name in ("val_dice_mean", "train_loss"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
                assert steps == [0, 1, 2], (run.data.tags["medssl.sweep_key"], name, steps)
            assert {"test_dice_mean", "test_dice_1", "test_dice_2"} <= set(run.data.metrics)
        parent = client.get_run(res.parent_run_id)
        assert parent.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(res.parent_run_id, "children_done")] == list(
            range(1, 5)
        )
        assert not list((tmp_path / "runs").rglob("mlflow_spool.jsonl"))  # nothing left unsent
        out = compare_study("outage", tracking_uri=uri, out_dir=tmp_path / "cmp")
        assert {r["n"] for r in out.rows} == {2}
    finally:
        for s in servers:
            if s is not None:
                _stop(s)
