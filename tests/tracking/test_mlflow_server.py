"""A real ``mlflow server`` goes down mid-run and comes back: no metric is lost (issue 5)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from medssl.tracking.mlflow_tracker import MlflowTracker
from tests.tracking.mlflow_server import free_port, start_server, stop_server


def _start(tmp: Path, port: int):
    proc = start_server(tmp, port, f"sqlite:///{tmp / 'server.db'}",
                        ["--artifacts-destination", str(tmp / "artifacts")])
    if proc is None:
        pytest.skip("mlflow server did not start within 40 s")
    return proc


@pytest.mark.timeout(90)
def test_server_outage_loses_no_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start(tmp_path, port)
    try:
        tr = MlflowTracker(
            "outage",
            tracking_uri=uri,
            spool_path=tmp_path / "spool.jsonl",
            flush_every_s=0.0,
            backoff_s=0.2,
            max_backoff_s=1.0,
            close_timeout_s=30,
        )
        tr.log_params({"lr": 0.1})
        for step in range(10):
            tr.log_metrics({"loss": float(step)}, step)
        stop_server(server, signal.SIGKILL)  # the server dies mid-run
        t0 = time.monotonic()
        for step in range(10, 30):  # server down: nothing raises, nothing blocks for long
            tr.log_metrics({"loss": float(step)}, step)
            time.sleep(0.05)
        assert time.monotonic() - t0 < 10 and (tmp_path / "spool.jsonl").exists()
        server = _start(tmp_path, port)
        for step in range(30, 40):
            tr.log_metrics({"loss": float(step)}, step)
        assert tr.close() is True
        history = tr.client.get_metric_history(tr.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(40))  # all there, none twice
        assert tr.client.get_run(tr.run_id).info.status == "FINISHED"
        assert not (tmp_path / "spool.jsonl").exists()
    finally:
        if server.poll() is None:
            stop_server(server)
