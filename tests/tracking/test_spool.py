"""medssl.tracking.spool without a server: who may replay a spool (the lock of a live writer), what a replay
sends, and that nothing is lost when a tracker and a replay meet on one spool."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from medssl.tracking.mlflow_tracker import MlflowTracker
from medssl.tracking.spool import SpoolLock, find_spools, replay_spools
from tests.tracking.test_mlflow_tracker import FakeClient

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _metric(step: int) -> str:
    return json.dumps({"run_id": "r1", "uri": "http://nowhere", "type": "metric", "key": "loss",
                       "value": float(step), "step": step, "ts": 1000 + step}) + "\n"


def test_a_spool_locked_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    spool = tmp_path / "run" / "mlflow_spool.jsonl"
    spool.parent.mkdir()
    spool.write_text(_metric(0) + _metric(1))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(spool) + ".lock", "30"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        client = FakeClient()
        res = replay_spools([tmp_path], client=client)
        assert res.busy == [spool.resolve()] and not res.sent and client.metrics == []
    finally:
        holder.kill()
        holder.wait()
    res = replay_spools([tmp_path], client=client)  # its writer is gone: now anyone may send it
    assert res.sent == {spool.resolve(): 2} and client.metrics == [("loss", 0.0, 0), ("loss", 1.0, 1)]
    assert not spool.exists() and not Path(str(spool) + ".lock").exists()


def test_an_open_trackers_spool_is_its_own_until_close(tmp_path: Path) -> None:
    client = FakeClient()
    tr = MlflowTracker("exp", client=client, spool_path=tmp_path / "mlflow_spool.jsonl", flush_every_s=0.0,
                       backoff_s=60, close_timeout_s=0.0)
    client.down = True
    tr.log_metrics({"loss": 1.0}, 0)
    assert (tmp_path / "mlflow_spool.jsonl").exists()
    client.down = False
    assert replay_spools([tmp_path], client=client).busy == [(tmp_path / "mlflow_spool.jsonl").resolve()]
    client.down = True
    assert tr.close() is False  # records stay in the spool, the lock goes
    client.down = False
    res = replay_spools([tmp_path], client=client)
    assert res.n_records == 2 and client.status == "FINISHED" and client.metrics == [("loss", 1.0, 0)]
    assert find_spools([tmp_path]) == []


def test_a_tracker_waits_for_a_replay_in_progress(tmp_path: Path) -> None:
    """A resumed run spooling while another command replays its old spool: it waits for the lock instead of
    appending to a file the replay is about to remove."""
    spool = tmp_path / "mlflow_spool.jsonl"
    spool.write_text(_metric(0))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(spool) + ".lock", "1.5"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    client = FakeClient()
    tr = MlflowTracker("exp", client=client, spool_path=spool, flush_every_s=0.0, backoff_s=60)
    client.down = True
    t0 = time.monotonic()
    tr.log_metrics({"loss": 5.0}, 5)  # fails, spools: takes the lock once the holder is gone
    assert time.monotonic() - t0 > 0.5 and holder.wait(timeout=10) == 0
    assert SpoolLock(spool).acquire() is False  # now the tracker holds it
    assert [json.loads(x)["step"] for x in spool.read_text().splitlines()] == [0, 5]
