"""The outage spool of :class:`~medssl.tracking.mlflow_tracker.MlflowTracker`: sending records, replaying a
spool file, and replaying the spools that dead jobs left behind (``medssl runs sync``, ``medssl sweep``).

A spool is a JSONL file (``<run folder>/mlflow_spool.jsonl``, or ``<cwd>/mlflow_spool/<run_id>.jsonl``), one
record per line: ``{"run_id", "uri"?, "type": "metric"|"param"|"tag"|"artifact"|"status", …}``. The tracker
that writes a spool holds an exclusive ``flock`` on ``<spool>.lock`` until it closes; the kernel drops that lock
when the process dies, so "no lock holder" means "the job that wrote it is gone" (finished or killed) and any
command may replay it. A spool whose writer is alive is left to that writer (it replays it itself).

Replaying twice never duplicates a metric: records keep their original timestamps, and the MLflow SQL store
skips a metric whose (key, timestamp, step, value) it already holds; params are logged with the same value,
tags and artifacts overwrite. A replay that fails midway writes the unsent tail back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SPOOL_NAME",
    "SpoolLock",
    "SyncResult",
    "find_spools",
    "flush_spool",
    "replay_spools",
    "send_records",
]

log = logging.getLogger(__name__)

SPOOL_NAME = "mlflow_spool.jsonl"
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100


class SpoolLock:
    """An exclusive ``flock`` on ``<spool>.lock``, held by the spool's live writer (or a replayer).

    Args:
        spool_path: the spool file the lock guards.
    """

    def __init__(self, spool_path: str | Path) -> None:
        self.spool_path = Path(spool_path)
        self.path = self.spool_path.with_name(self.spool_path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout_s: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout_s`` seconds; False when another open file (a live process,
        or a replay in progress) still holds it then."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
                continue
            try:  # the holder before us may have unlinked the file: lock the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        """Drop the lock; the lock file goes too once the spool is gone (nothing left to guard)."""
        if self._fd is None:
            return
        if not self.spool_path.exists():
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def send_records(client: Any, run_id: str, records: Iterable[dict[str, Any]]) -> None:
    """Send records in order: consecutive metrics/params/tags as ``log_batch`` calls within MLflow's limits,
    artifacts with ``log_artifact``, the end status with ``set_terminated``. Raises on the first failure."""
    from mlflow.entities import Metric, Param, RunTag

    batch: dict[str, list] = {"metric": [], "param": [], "tag": []}

    def send_batch() -> None:
        if any(batch.values()):
            client.log_batch(run_id, metrics=batch["metric"], params=batch["param"], tags=batch["tag"])
            for v in batch.values():
                v.clear()

    for rec in records:
        kind = rec["type"]
        if kind == "metric":
            batch["metric"].append(Metric(rec["key"], rec["value"], rec["ts"], rec["step"]))
        elif kind == "param":
            batch["param"].append(Param(rec["key"], rec["value"]))
        elif kind == "tag":
            batch["tag"].append(RunTag(rec["key"], rec["value"]))
        else:
            send_batch()
            if kind == "artifact":
                if Path(rec["path"]).exists():
                    client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
                else:
                    log.warning("artifact %s vanished before upload; skipped", rec["path"])
            elif kind == "status":
                client.set_terminated(run_id, status=rec["status"], end_time=rec.get("end"))
        if (
            len(batch["metric"]) >= _MAX_METRICS
            or len(batch["param"]) >= _MAX_PARAMS
            or len(batch["tag"]) >= _MAX_TAGS
        ):
            send_batch()
    send_batch()


def flush_spool(spool_path: str | Path, *, tracking_uri: str | None = None, client: Any = None) -> int:
    """Replay a JSONL spool written by :class:`~medssl.tracking.mlflow_tracker.MlflowTracker`; removes the
    file when all is sent. Takes no lock (callers that may race a live writer use :func:`replay_spools`).

    Records are sent in file order, grouped per run. On failure the unsent tail is written back (nothing
    sent is sent twice) and the exception propagates.

    Args:
        tracking_uri: the store to send to; default: each record's own ``uri`` (the store its run lives in),
            else :func:`~medssl.tracking.mlflow_tracker.default_tracking_uri`.
        client: an ``MlflowClient``-like object used for every record (tests pass fakes).

    Returns:
        Number of records sent.
    """
    from medssl.tracking.mlflow_tracker import make_client

    spool_path = Path(spool_path)
    if not spool_path.exists():
        return 0
    clients: dict[str | None, Any] = {}

    def client_for(rec: dict[str, Any]) -> Any:
        if client is not None:
            return client
        uri = tracking_uri or rec.get("uri")
        if uri not in clients:
            clients[uri] = make_client(uri)
        return clients[uri]

    records = [json.loads(line) for line in spool_path.read_text().splitlines() if line.strip()]
    sent = 0
    try:
        i = 0
        while i < len(records):  # one run's consecutive records at a time
            run_id, uri = records[i]["run_id"], records[i].get("uri")
            j = i
            while j < len(records) and (records[j]["run_id"], records[j].get("uri")) == (run_id, uri):
                j += 1
            body = [{k: v for k, v in r.items() if k not in ("run_id", "uri")} for r in records[i:j]]
            send_records(client_for(records[i]), run_id, body)
            sent, i = j, j
    except Exception:
        tmp = spool_path.with_name(spool_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records[sent:]))
        os.replace(tmp, spool_path)
        raise
    spool_path.unlink()
    return sent


def find_spools(roots: Iterable[str | Path]) -> list[Path]:
    """Spool files under ``roots`` (files are taken as they are): every ``mlflow_spool.jsonl`` and every
    ``mlflow_spool/<run_id>.jsonl``, sorted, each once."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob(SPOOL_NAME) if p.is_file())
            found.update(p.resolve() for p in root.rglob("mlflow_spool/*.jsonl") if p.is_file())
    return sorted(found)


@dataclass
class SyncResult:
    """What :func:`replay_spools` did, per spool file.

    Attributes:
        sent: spool → records sent (the file is gone).
        busy: spools whose writer is still alive (left to it).
        failed: spool → error (the unsent tail is still in the file; retry later).
    """

    sent: dict[Path, int] = field(default_factory=dict)
    busy: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)

    @property
    def n_records(self) -> int:
        return sum(self.sent.values())


def replay_spools(
    roots: Iterable[str | Path], *, tracking_uri: str | None = None, client: Any = None
) -> SyncResult:
    """Replay every spool under ``roots`` whose writer is gone (no live lock holder); the library entry point
    behind ``medssl runs sync``, and what ``medssl sweep`` runs on its study folder before anything else.

    Args:
        roots: run / sweep / study folders, or spool files.
        tracking_uri: send everything there (default: each record's own store, see :func:`flush_spool`).
        client: an ``MlflowClient``-like object (tests pass fakes).

    Returns:
        The :class:`SyncResult`; a spool that cannot be sent (server still down) is listed in ``failed`` and
        kept, never raised.
    """
    res = SyncResult()
    for spool in find_spools(roots):
        lock = SpoolLock(spool)
        if not lock.acquire():
            log.info("spool %s belongs to a running job; left to it", spool)
            res.busy.append(spool)
            continue
        try:
            res.sent[spool] = n = flush_spool(spool, tracking_uri=tracking_uri, client=client)
            log.info("replayed %d record(s) from %s", n, spool)
        except Exception as e:  # noqa: BLE001 - one unreachable store never stops the others
            res.failed[spool] = f"{type(e).__name__}: {e}"[:500]
            log.warning("spool %s not replayed (kept): %s", spool, res.failed[spool])
        finally:
            lock.release()
    return res
