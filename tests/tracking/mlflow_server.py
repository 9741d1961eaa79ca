"""A real ``mlflow server`` on 127.0.0.1 for the outage tests (shared by test_mlflow_server/test_mlflow_outage)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["free_port", "start_server", "stop_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cwd: Path, port: int, backend_uri: str, artifact_args: list[str],
                 timeout_s: float = 40.0) -> subprocess.Popen | None:
    """``mlflow server`` on 127.0.0.1 in its own process group; ``None`` if not healthy within ``timeout_s``.

    Args:
        artifact_args: the artifact option, e.g. ``["--default-artifact-root", dir]``.
    """
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, *artifact_args]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: starts ~2x faster
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    return None


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's own process group (gunicorn/uvicorn workers included) and wait for it."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=20)
