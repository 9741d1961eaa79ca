"""Issue 11: a team MLflow server (PostgreSQL backend, S3-compatible artifacts on moto where installed) and a
study whose children run at the same time, as array tasks do: three real ``medssl finetune`` processes of one
parent log into it concurrently, and the server holds exactly what each child recorded locally — no metric,
param, tag or artifact lost or twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medssl.config import flatten_dict
from medssl.data.splits import split_datalist
from medssl.engines.finetune.config import FinetuneConfig
from medssl.tracking.compare import child_runs
from medssl.tracking.mlflow_tracker import MlflowTracker, make_client, standard_tags
from medssl.tracking.spool import find_spools
from tests.tracking._pg import PgMlflow

pytestmark = [pytest.mark.server, pytest.mark.timeout(420)]

STUDY, SEEDS = "pg-study", (0, 1, 2)
NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}


def _data(folder: Path) -> tuple[Path, Path]:
    """8 labelled 12³ volumes (a bright cube is class 1) and splits for seeds 0–2."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        lab = np.zeros((12, 12, 12), np.uint8)
        lab[3 + i % 3 : 8, 3:8, 3:8] = 1
        img = (rng.normal(size=lab.shape) + 2.0 * lab).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"case{i}"})
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(folder / "datalist.json", fractions=[100], seeds=list(SEEDS), test_fraction=0.25,
                               val_fraction=0.25)
    return folder / "datalist.json", splits


def _child_config(tmp: Path, data: tuple[Path, Path], seed: int, uri: str, parent: str) -> Path:
    key = f"f100-scratch-s{seed}"
    cfg = {"datalist": str(data[0]), "splits": str(data[1]), "fraction": 100, "seed": seed, "init": "scratch",
           "network": "SegResNet", "network_kwargs": NET, "out_channels": 2, "roi_size": [8, 8, 8],
           "normalisation": "none", "batch_size": 1, "num_samples": 1, "max_steps": 6, "val_every_steps": 2,
           "sw_overlap": 0.0, "sw_batch_size": 1, "device": "cpu", "num_workers": 0, "study": STUDY,
           "experiment": STUDY, "tracking_uri": uri, "parent_run_id": parent, "run_name": f"{STUDY}/{key}",
           "out_dir": str(tmp / "runs" / key), "tags": {"medssl.sweep_key": key}}
    path = tmp / f"{key}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _artifacts(client, run_id: str, path: str | None = None) -> dict[str, int]:
    """Every artifact file of the run (recursive) → its size in bytes."""
    out: dict[str, int] = {}
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path: f.file_size}
    return out


def test_concurrent_children_log_everything_exactly_once(pg_mlflow: PgMlflow, tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    parent = MlflowTracker(STUDY, run_name=STUDY, tracking_uri=pg_mlflow.uri,
                           tags=standard_tags("sweep", study=STUDY), spool_path=tmp_path / "mlflow_spool.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": pg_mlflow.uri}
    medssl = str(Path(sys.executable).parent / "medssl")
    procs = [  # the array tasks: started together, each its own process
        subprocess.Popen([medssl, "finetune", "--config", str(_child_config(tmp_path, data, s, pg_mlflow.uri,
                                                                            parent.run_id))],
                         env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for s in SEEDS
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=360)
        outs.append(out)
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    parent.log_metrics({"children_done": 3.0}, step=1)
    assert parent.close() is True

    client = make_client(pg_mlflow.uri)
    runs = child_runs(client, client.get_run(parent.run_id))
    by_key = {r.data.tags["medssl.sweep_key"]: r for r in runs}
    assert len(runs) == 3 and set(by_key) == {f"f100-scratch-s{s}" for s in SEEDS}  # one run per child
    starts = [r.info.start_time for r in runs]
    ends = [r.info.end_time for r in runs]
    assert max(starts) < min(ends), "the children did not run at the same time"
    artifacts: dict[str, list[str]] = {}
    for seed in SEEDS:
        key = f"f100-scratch-s{seed}"
        run, out = by_key[key], tmp_path / "runs" / key
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.run_id and tags["medssl.study"] == STUDY
        assert tags["medssl.seed"] == str(seed) and tags["medssl.status"] == "finished"
        # params: every field of the child's own config.yaml, as the child wrote it
        local_cfg = flatten_dict(FinetuneConfig.from_yaml(out / "config.yaml").to_dict())
        for k, v in local_cfg.items():
            assert run.data.params.get(k) == str(v)[:6000], (key, k)
        # metrics: the local history (checkpoint) and results.json, each value exactly once
        history = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["history"]
        results = json.loads((out / "results.json").read_text())
        val_keys = {k for h in history for k in h if k.startswith("val_")}
        assert val_keys and "val_dice_mean" in val_keys
        for k in val_keys:
            local = sorted((int(h["step"]), float(h[k])) for h in history if k in h)
            remote = sorted((m.step, m.value) for m in client.get_metric_history(rid, k))
            assert [s for s, _ in remote] == [s for s, _ in local], (key, k)
            assert [v for _, v in remote] == pytest.approx([v for _, v in local], nan_ok=True), (key, k)
        for k, v in results["test_metrics"].items():
            remote = [m.value for m in client.get_metric_history(rid, f"test_{k}")]
            assert remote == pytest.approx([v], nan_ok=True), (key, k)
        # artifacts: each one a file of the run folder, byte size as on disk; the checkpoint among them
        listed = _artifacts(client, rid)
        artifacts[rid] = sorted(listed)
        assert {"results.json", "checkpoints/best.pt", "config.yaml"} <= set(listed), listed
        for path, size in listed.items():
            assert size == (out / path).stat().st_size, (key, path)
    if pg_mlflow.s3_endpoint:  # the artifacts really are in the S3-compatible store, once per run
        import boto3

        s3 = boto3.client("s3", endpoint_url=pg_mlflow.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
        for run in runs:
            mine = sorted(k.split("/artifacts/", 1)[1] for k in keys if f"/{run.info.run_id}/artifacts/" in k)
            assert mine == artifacts[run.info.run_id], mine
    assert [m.step for m in client.get_metric_history(parent.run_id, "children_done")] == [1]
    assert find_spools([tmp_path]) == []  # the server never dropped a request: nothing was spooled
