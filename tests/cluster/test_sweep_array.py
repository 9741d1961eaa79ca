"""A tiny real study as SLURM jobs on the local cluster: ``medssl sweep --slurm`` submits the pretraining and one
array (a task per child, ``afterok``); every run lands under one MLflow parent; ``medssl sweep FILE`` shows the
status while jobs are active, afterwards skips every finished child and closes the parent; ``compare`` works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medssl.cli import app
from medssl.cluster.sweep_jobs import active_jobs
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.compare import DIFF, compare_study
from medssl.tracking.mlflow_tracker import make_client
from tests.cluster._slurm import LocalSlurm

pytestmark = pytest.mark.slurm
SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}


def _spec(hippocampus_dir: Path, tmp: Path) -> Path:
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:6]
    items = [{"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": p.name[:-7]}
             for p in images]  # fmt: skip
    (tmp / "data").mkdir()
    (tmp / "data" / "datalist.json").write_text(json.dumps({"training": items}))
    spec = {
        "study": "hippo-array", "experiment": "sweep-slurm", "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        "out_dir": str(tmp / "runs"),
        "data": {"datalist": str(tmp / "data" / "datalist.json"), "test_fraction": 0.2, "val_fraction": 0.2},
        "pretrain": {"method": "simclr", "encoder": "segresnet", "encoder_kwargs": SEG_NET, "roi_size": [16] * 3,
                     "method_kwargs": {"hidden_dim": 8, "out_dim": 4}, "total_steps": 2, "batch_size": 2,
                     "target_spacing": [1.0, 1.0, 1.0], "device": "cpu", "preview": False},
        "finetune": {"network": "SegResNet", "network_kwargs": SEG_NET, "roi_size": [16] * 3, "max_epochs": 1,
                     "batch_size": 2, "sw_overlap": 0.0, "sw_batch_size": 8, "device": "cpu"},
        "fractions": [100], "inits": ["scratch", "ssl"], "seeds": [0], "metric": "test_dice_mean",
    }  # fmt: skip
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.timeout(600)
def test_sweep_as_job_array(slurm_cluster: LocalSlurm, hippocampus_dir: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SLURM_CONF", "OMP_NUM_THREADS"):
        monkeypatch.setenv(k, slurm_cluster.env[k] if k == "SLURM_CONF" else "1")
    monkeypatch.chdir(tmp_path)
    study = _spec(hippocampus_dir, tmp_path)
    runner = CliRunner()
    emitted = runner.invoke(app, ["sweep", str(study), "--emit-jobs", str(tmp_path / "emitted")])
    assert emitted.exit_code == 0, emitted.output
    script = (tmp_path / "emitted" / "children.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "--child \"$SLURM_ARRAY_TASK_ID\"" in script
    assert "scontrol requeue" in script and "#SBATCH --signal=B:USR1@" in script
    assert "afterok" in (tmp_path / "emitted" / "submit.sh").read_text()
    assert not (tmp_path / "emitted" / "jobs.json").exists()  # written, not submitted

    sub = runner.invoke(app, ["sweep", str(study), "--slurm"])
    assert sub.exit_code == 0, sub.output
    rec = json.loads((tmp_path / "runs" / "hippo-array" / "slurm" / "jobs.json").read_text())
    assert rec["keys"] == ["f100-scratch-s0", "f100-ssl-s0"] and rec["pretrain_job"]
    dep = slurm_cluster.job_field(rec["children_job"] + "_0", "Dependency") or slurm_cluster.job_field(
        rec["children_job"], "Dependency")
    assert f"afterok:{rec['pretrain_job']}" in dep
    # while the jobs are active, `medssl sweep FILE` only shows their status (runs nothing here)
    assert active_jobs(study)
    status = runner.invoke(app, ["sweep", str(study)])
    assert status.exit_code == 0 and "SLURM jobs still active" in status.output, status.output
    assert not (tmp_path / "runs" / "hippo-array" / "sweep" / "sweep.json").exists()

    logs = lambda: "\n".join(p.read_text()[-3000:] for p in (tmp_path / "runs" / "hippo-array" / "slurm" / "logs").glob("*"))  # noqa: E731,E501
    assert slurm_cluster.wait_job(rec["pretrain_job"], timeout=300) == "COMPLETED", logs()
    assert slurm_cluster.wait_job(rec["children_job"], timeout=400) == "COMPLETED", logs()
    assert not active_jobs(study)

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = make_client(uri)
    parent = client.get_run(rec["parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    keys = sorted(r.data.tags.get("medssl.sweep_key") for r in kids)
    assert keys == ["f100-scratch-s0", "f100-ssl-s0", "pretrain"]  # one parent: no duplicates, none lost
    assert all(r.info.status == "FINISHED" for r in kids), [(r.data.tags, r.info.status) for r in kids]

    res = run_sweep(study)  # what `medssl sweep FILE` does afterwards: nothing runs again
    assert res.parent_run_id == rec["parent_run_id"]
    assert {c.status for c in res.children} == {"SKIPPED"}
    assert client.get_run(rec["parent_run_id"]).info.status == "FINISHED"
    out = compare_study("hippo-array", tracking_uri=uri)
    assert {(r["fraction"], r["init"]) for r in out.rows} == {(100.0, "scratch"), (100.0, "ssl"), (100.0, DIFF)}
