"""Issue 5: a tiny sweep against a real ``mlflow server``; the server dies mid-sweep and comes back after a
few seconds; the sweep completes and no metric is lost (the trackers buffer, spool and retry)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.compare import compare_study
from medssl.tracking.mlflow_tracker import make_client
from tests.engines.studies.test_sweep import FakeFinetune, FakePretrain, children, fresh_sqlite_uri, pipeline
from tests.tracking.mlflow_server import free_port, start_server, stop_server


def _artifact_args(tmp: Path) -> list[str]:
    return ["--default-artifact-root", str(tmp / "art")]


@pytest.mark.timeout(120)
def test_sweep_survives_server_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    db_uri = fresh_sqlite_uri(tmp_path / "server")
    servers = [start_server(tmp_path, port, db_uri, _artifact_args(tmp_path))]
    if servers[0] is None:
        pytest.skip("mlflow server did not start within 40 s")
    outage: dict[str, object] = {}
    victim = "f100-scratch-s1"  # third child: the parent and two children exist already

    def on_epoch(key: str, epoch: int) -> None:
        if key == victim and epoch == 0:
            stop_server(servers[-1], signal.SIGKILL)  # the server dies mid-run
            outage["down_at"] = time.monotonic()

            def restart() -> None:
                time.sleep(2.0)
                servers.append(start_server(tmp_path, port, db_uri, _artifact_args(tmp_path)))
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
                stop_server(s)
