"""Thin MLflow layer: default sqlite store, experiments by name, parent/child runs, standard tags, and
buffered logging that survives a tracking-server outage.

Buffering: every metric/param/tag/artifact/status call becomes a record in an in-memory queue. The
queue is sent with ``MlflowClient.log_batch`` when it is large or old enough. If sending fails, the
unsent records are appended to a local JSONL *spool* at once (so even a killed process loses nothing)
and retried later with exponential backoff, never blocking the training step. :meth:`MlflowTracker.close`
retries until ``close_timeout_s``; whatever is still unsent stays in the spool with a warning, and
:func:`~medssl.tracking.spool.replay_spools` replays it later: ``medssl runs sync``, the next ``medssl sweep``
of the study, or the run's own resume. While open, the tracker holds a lock on its spool (``<spool>.lock``), so
those replay only spools whose writer is gone (:mod:`medssl.tracking.spool`).

Only the ``MlflowClient`` API is used (no fluent global state), so trackers can be nested (parent/child)
and a fake client can stand in for tests.

``on_durable(records)`` (optional) is called with the records that have just become durable, i.e. were sent or
appended (fsynced) to the spool; records still in the memory queue when the process dies are not. A resumed
finetuning or pretraining run uses it to know what an earlier attempt already logged
(:mod:`medssl.engines.runtime.ledger`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.tracking.spool import SpoolLock, flush_spool, send_records

__all__ = [
    "MlflowTracker",
    "flush_spool",
    "send_records",
    "default_tracking_uri",
    "standard_tags",
    "git_sha",
    "make_client",
    "artifact_location",
]

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlruns.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def make_client(tracking_uri: str | None = None):
    """An ``mlflow.MlflowClient`` for ``tracking_uri`` (default :func:`default_tracking_uri`).

    For a remote server, MLflow's own HTTP retries (7 retries with exponential backoff, 120 s timeout by
    default) would block a training step for minutes during an outage; the tracker retries by itself, so
    unless the user set them, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``
    are set for this process.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(tracking_uri=uri)


def git_sha(path: str | Path | None = None) -> str | None:
    """Commit of the git checkout holding ``path`` (default: the medssl sources); outside git (a Docker image
    built by ``docker/Dockerfile``) ``$MEDSSL_GIT_SHA``, the commit the image was built from; else ``None``."""
    where = Path(path) if path else Path(__file__).resolve().parent
    baked = os.environ.get("MEDSSL_GIT_SHA") or None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return baked
    return (out.stdout.strip() or None if out.returncode == 0 else None) or baked


def standard_tags(
    kind: str,
    *,
    study: str | None = None,
    fraction: float | None = None,
    init: str | None = None,
    seed: int | None = None,
    data_hash: str | None = None,
    sha: str | None = None,
) -> dict[str, str]:
    """medssl's standard run tags (``medssl.kind``, ``medssl.study``, ``medssl.fraction``, ``medssl.init``,
    ``medssl.seed``, ``medssl.data_hash``, ``medssl.git_sha``); unset values are left out.

    Args:
        kind: ``"pretrain"``, ``"finetune"``, ``"sweep"`` or ``"compare"``.
        sha: git commit; looked up with :func:`git_sha` when ``None``.
    """
    tags = {
        "medssl.kind": kind,
        "medssl.study": study,
        "medssl.fraction": fraction,
        "medssl.init": init,
        "medssl.seed": seed,
        "medssl.data_hash": data_hash,
        "medssl.git_sha": sha or git_sha(),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``<db folder>/mlartifacts/<experiment>`` (a ``file://`` URI) for a local
    sqlite store, so that nothing lands in the cwd's ``./mlruns``; ``None`` (the server decides) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts" / experiment.replace("/", "_")).resolve().as_uri()


class MlflowTracker:
    """One MLflow run with buffered, outage-proof logging.

    Args:
        experiment: experiment name (created if missing).
        run_name: display name of the run.
        tracking_uri: default :func:`default_tracking_uri`.
        tags: run tags (e.g. :func:`standard_tags`).
        parent_run_id: makes this a child run (``mlflow.parentRunId``).
        run_id: attach to an existing run instead of creating one (resume).
        spool_path: JSONL spool for unsent records (default ``<cwd>/mlflow_spool/<run_id>.jsonl``).
        client: an ``MlflowClient``-like object (tests pass fakes).
        flush_every_s: send the queue at least this often.
        max_buffer: send the queue when it holds this many records.
        backoff_s: first retry delay after a failure; doubles per failure up to ``max_backoff_s``.
        close_timeout_s: how long :meth:`close` keeps retrying before leaving records in the spool.
        on_durable: called with each list of records once sent or spooled (an error in it is logged, never
            raised); settable later as the attribute ``on_durable``.

    Raises:
        MedsslError: the run cannot be created (tracking server unreachable at start).
    """

    def __init__(
        self,
        experiment: str,
        *,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        spool_path: str | Path | None = None,
        client: Any = None,
        flush_every_s: float = 5.0,
        max_buffer: int = 200,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        close_timeout_s: float = 30.0,
        on_durable: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = client if client is not None else make_client(self.tracking_uri)
        self.flush_every_s, self.max_buffer = float(flush_every_s), int(max_buffer)
        self.backoff_s, self.max_backoff_s, self.close_timeout_s = backoff_s, max_backoff_s, close_timeout_s
        self._queue: list[dict[str, Any]] = []
        self._lock: SpoolLock | None = None
        self._failures, self._next_try, self._last_flush = 0, 0.0, time.monotonic()
        self.closed = False
        self.on_durable = on_durable
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.experiment_id = self._retry_call(
            lambda: self._experiment_id(experiment), "get/create experiment"
        )
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as e:  # noqa: BLE001 - unknown run in this store: start a new one
                log.warning("cannot reattach to MLflow run %s (%s); starting a new run", run_id, e)
                run_id = None
        if run_id is None:
            run = self._retry_call(
                lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name),
                "create run",
            )
            run_id, all_tags = run.info.run_id, {}
        self.run_id: str = run_id
        self.spool_path = Path(spool_path) if spool_path else Path.cwd() / "mlflow_spool" / f"{run_id}.jsonl"
        if all_tags:  # reattached run: refresh its tags
            self.set_tags(all_tags)

    # -- set-up ----------------------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(
            name, artifact_location=artifact_location(self.tracking_uri, name)
        )

    def _retry_call(self, fn, what: str, attempts: int = 4):
        delay = self.backoff_s
        for i in range(attempts):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - any client/transport error
                if i == attempts - 1:
                    raise MedsslError(f"MLflow at {self.tracking_uri}: cannot {what}: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        return None  # pragma: no cover

    # -- logging API (all buffered) ---------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (values stringified, truncated to MLflow's 6000 characters)."""
        for k, v in params.items():
            self._queue.append({"type": "param", "key": str(k), "value": str(v)[:_MAX_PARAM_LEN]})
        self._maybe_flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags."""
        for k, v in tags.items():
            self._queue.append({"type": "tag", "key": str(k), "value": str(v)})
        self._maybe_flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at ``step`` (non-numbers are ignored with a debug line)."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; not logged", k, v)
                continue
            self._queue.append({"type": "metric", "key": str(k), "value": value, "step": int(step), "ts": ts})
        self._maybe_flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file upload (the file must still exist when the queue is sent)."""
        self._queue.append(
            {"type": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path}
        )
        self._maybe_flush(force=True)

    # -- sending --------------------------------------------------------------------------------------
    def _maybe_flush(self, force: bool = False) -> None:
        now = time.monotonic()
        due = force or len(self._queue) >= self.max_buffer or now - self._last_flush >= self.flush_every_s
        if due and now >= self._next_try:
            self.flush()
        elif due and self._failures:
            self._spool_queue()  # outage, waiting for the next retry: keep records on disk, not in memory

    def flush(self) -> bool:
        """Send the spool, then the queue. Returns True when nothing is left unsent.

        On failure the queue moves to the spool file and the next attempt waits (exponential backoff).
        """
        self._last_flush = time.monotonic()
        ok = True
        if self.spool_path.exists():
            self._own_spool()
            try:
                flush_spool(self.spool_path, client=self.client)
            except Exception as e:  # noqa: BLE001
                log.debug("spool replay failed: %s", e)
                ok = False
        if ok and self._queue:
            try:
                send_records(self.client, self.run_id, self._queue)
                self._durable()
            except Exception as e:  # noqa: BLE001
                ok = False
                log.debug("MLflow send failed: %s", e)
        if not ok:
            self._spool_queue()
            self._failures += 1
            delay = min(self.backoff_s * 2 ** (self._failures - 1), self.max_backoff_s)
            self._next_try = time.monotonic() + delay
            if self._failures == 1:
                log.warning(
                    "MLflow at %s unreachable; buffering to %s and retrying",
                    self.tracking_uri,
                    self.spool_path,
                )
        else:
            if self._failures:
                log.info("MLflow reachable again; buffered records sent")
            self._failures, self._next_try = 0, 0.0
        return ok

    def persist(self) -> None:
        """Make every queued record durable now: sent, or (while an outage's retry is not yet due, so without
        waiting on the network) appended to the spool. Call it before writing a checkpoint: a process killed after
        the checkpoint then loses no record that a resume from it would not log again."""
        if not self._queue:
            return
        if self._failures and time.monotonic() < self._next_try:
            self._spool_queue()
        else:
            self.flush()

    def _own_spool(self) -> None:
        """Hold the lock of the current :attr:`spool_path` (it may be re-pointed after start), so that
        ``medssl runs sync`` / ``medssl sweep`` leave this live run's spool alone."""
        if self._lock is not None and self._lock.spool_path == self.spool_path:
            return
        if self._lock is not None:
            self._lock.release()
        self._lock = SpoolLock(self.spool_path)
        # a replay by another command holds it for seconds: wait, else records appended now could be lost
        # when that replay removes the file; after 10 s another live tracker shares it: append anyway
        if not self._lock.acquire(timeout_s=10.0):
            log.warning("spool %s is locked by another live process; appending without the lock", self.spool_path)

    def _spool_queue(self) -> None:
        if not self._queue:
            return
        self._own_spool()
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool_path, "a") as f:
            for rec in self._queue:
                f.write(json.dumps({"run_id": self.run_id, "uri": self.tracking_uri, **rec}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._durable()

    def _durable(self) -> None:
        """The queue reached MLflow or the spool: tell :attr:`on_durable`, then empty it."""
        if self.on_durable is not None:
            try:
                self.on_durable(list(self._queue))
            except Exception as e:  # noqa: BLE001 - bookkeeping never stops logging
                log.warning("on_durable hook failed: %s", e)
        self._queue.clear()

    def close(self, status: str = "FINISHED") -> bool:
        """Mark the run ended and send everything, retrying up to ``close_timeout_s``.

        Returns:
            True if all records reached MLflow; False if some remain in :attr:`spool_path` (warned).
        """
        if self.closed:
            return True
        self.closed = True
        self._queue.append({"type": "status", "status": status, "end": int(time.time() * 1000)})
        deadline = time.monotonic() + self.close_timeout_s
        try:
            return self._close_flush(deadline)
        finally:
            if self._lock is not None:  # from now on the spool (if any) is an orphan any command may replay
                self._lock.release()

    def _close_flush(self, deadline: float) -> bool:
        while True:
            if self.flush():
                return True
            wait = self._next_try - time.monotonic()
            if time.monotonic() + max(wait, 0) > deadline:
                log.warning(
                    "MLflow unreachable at close; %s unsent record(s) kept in %s "
                    "(replay with `medssl runs sync`)",
                    _count_lines(self.spool_path),
                    self.spool_path,
                )
                return False
            time.sleep(max(wait, 0.0))

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def _count_lines(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0
