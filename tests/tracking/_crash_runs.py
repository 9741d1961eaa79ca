"""Shared by the crash-resume logging tests (finetuning and pretraining): run a training script in a subprocess
that may SIGKILL itself, and read back every metric's MLflow history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from medssl.tracking.mlflow_tracker import make_client

REPO = Path(__file__).resolve().parents[2]


def run_killable(script: Path, args: list[str], out: Path, kill_at: int, cwd: Path) -> dict[str, Any] | None:
    """``python script *args`` with one thread and the repo on the path; ``kill_at`` > 0: the script must die of
    SIGKILL (returns ``None``), else succeed and have written its JSON result to ``out`` (returned)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )
    if kill_at:
        assert proc.returncode == -9, proc.stderr[-3000:]
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric key of the run → its sorted ``(step, value)`` history (duplicates kept)."""
    client = make_client(uri)
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
