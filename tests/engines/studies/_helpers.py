"""Shared by the study tests: a ready MLflow sqlite store, a sweep's child runs, the tiny SegResNet and a
datalist of the first real hippocampus cases."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medssl.tracking.mlflow_tracker import make_client

__all__ = ["SEG_NET", "children", "fresh_sqlite_uri", "hippocampus_datalist"]

#: a SegResNet small enough for 16³ patches and seconds-long CPU runs
SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}


@functools.lru_cache(maxsize=1)
def _template_db() -> Path:
    """One initialised MLflow sqlite DB per test process (creating the schema takes seconds)."""
    d = Path(tempfile.mkdtemp(prefix="medssl-mlflow-template-"))
    make_client(f"sqlite:///{d / 'mlruns.db'}").search_experiments()
    return d / "mlruns.db"


def fresh_sqlite_uri(folder: Path, name: str = "mlruns.db") -> str:
    """A ready MLflow sqlite store at ``folder/name`` (copied from the template)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_template_db(), folder / name)
    return f"sqlite:///{folder / name}"


def children(uri: str, parent_id: str) -> list[Any]:
    """The child runs of sweep parent run ``parent_id``."""
    c = make_client(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def hippocampus_datalist(hippocampus_dir: Path, folder: Path, n: int = 6) -> Path:
    """``folder/datalist.json``: the first ``n`` labelled cases of ``hippocampus_dir`` (MSD layout) as
    ``{"training": [{"image", "label", "case_id"}, ...]}`` (``folder`` is created; an earlier file is replaced)."""
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:n]
    items = [
        {"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": p.name[: -len(".nii.gz")]}
        for p in images
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path
