"""Outcomes of a label-fraction sweep (`ChildOutcome`, `SweepResult`) and the local ``sweep_child.json``
markers that tell finished children apart when MLflow has not received their end status yet.

Part of :mod:`medssl.engines.studies.sweep` (which re-exports the public names).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.data.splits import fraction_key

__all__ = ["ChildOutcome", "SweepResult", "read_marker"]

_MARKER = "sweep_child.json"


@dataclass
class ChildOutcome:
    """One (fraction, init, seed) child: ``status`` FINISHED, SKIPPED (finished earlier) or FAILED."""

    key: str
    fraction: float
    init: str
    seed: int
    out_dir: Path
    status: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    config_hash: str | None = None
    data_hash: str | None = None


@dataclass
class SweepResult:
    """What :func:`medssl.engines.studies.sweep.run_sweep` did."""

    study: str
    parent_run_id: str
    sweep_dir: Path
    data_hash: str
    encoder_path: Path | None = None
    pretrain_run_id: str | None = None
    children: list[ChildOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[ChildOutcome]:
        return [c for c in self.children if c.status == "FAILED"]

    def table(self, metric: str | None = None) -> Any:
        """Rich ``Table`` of the children: key, status, run id, ``metric`` (or all test metrics), error."""
        from rich.table import Table

        t = Table(title=f"medssl sweep {self.study} (parent run {self.parent_run_id})")
        for col in ("child", "status", "run id", metric or "test metrics", "error"):
            t.add_column(col, overflow="fold")
        style = {"FINISHED": "green", "SKIPPED": "dim", "FAILED": "red"}
        for c in self.children:
            m = {
                k: v
                for k, v in c.metrics.items()
                if metric is None or k in (metric, metric.removeprefix("test_"))
            }
            vals = ", ".join(f"{k}={v:.4f}" for k, v in m.items())
            t.add_row(c.key, f"[{style.get(c.status, '')}]{c.status}[/]", c.run_id or "", vals, c.error or "")
        return t


def _data_hash(datalist: Path, splits: Path) -> str:
    """Study-level data hash (parent run tag): the datalist bytes and the fixed test set. Adding seeds or
    fractions (which rewrites ``splits.json``) keeps it; each child's own ``medssl.data_hash`` also covers its
    training and validation sets (:func:`medssl.engines.finetune.identity.split_data_hash`)."""
    from medssl.data.splits import load_splits

    h = hashlib.sha256(datalist.read_bytes())
    h.update(json.dumps(sorted(load_splits(splits)["test"])).encode())
    return h.hexdigest()[:16]


def _child_key(fraction: float, init: str, seed: int) -> str:
    return f"f{fraction_key(fraction)}-{init}-s{seed}"


def read_marker(out: Path) -> dict[str, Any]:
    """The ``sweep_child.json`` marker of child folder ``out`` (``{}`` when absent or unreadable)."""
    try:
        return json.loads((out / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_marker(c: ChildOutcome, identity: dict[str, Any] | None = None) -> None:
    """``sweep_child.json``: status (RUNNING at the start, then FINISHED / FAILED), run id, metrics, and what
    the child was run with (``config_hash``, ``data_hash``, ``config``: the identity behind the hash)."""
    c.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = c.out_dir / f".{_MARKER}.tmp"
    data = {"status": c.status, "run_id": c.run_id, "metrics": c.metrics, "config_hash": c.config_hash,
            "data_hash": c.data_hash}
    if identity is None:
        identity = read_marker(c.out_dir).get("config")
    tmp.write_text(json.dumps(data | {"config": identity}, default=str))
    os.replace(tmp, c.out_dir / _MARKER)
