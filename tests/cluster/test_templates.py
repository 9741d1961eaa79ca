"""docker/slurm templates on the local cluster: the CPU/Gloo pretraining template (srun → torchrun, 2 ranks,
c10d rendezvous from ``scontrol show hostnames``) trains like the same run under plain torchrun; a job that
gets the preemption signal (``scancel --signal=USR1 --batch``) checkpoints at the next step, requeues itself,
resumes with ``--resume auto`` and ends with the uninterrupted job's loss history."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from medssl.engines.runtime.checkpoint import load_checkpoint
from tests.cluster._slurm import LocalSlurm
from tests.engines.conftest import toy_config, write_volumes

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "docker" / "slurm" / "pretrain_cpu.sbatch"
STEPS = 8


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _submit(cluster: LocalSlurm, cfg: Path, log: Path, **env: str) -> str:
    saved = dict(cluster.env)
    cluster.env.update(env)
    try:
        return cluster.run("sbatch", "--parsable", "-o", str(log), "-D", str(REPO), str(TEMPLATE), str(cfg)
                           ).stdout.strip().split(";")[0]
    finally:
        cluster.env.clear()
        cluster.env.update(saved)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("templates")
    datalist = write_volumes(tmp / "vols")
    out = {}
    for name in ("plain", "preempted"):
        det = dict(augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0}, checkpoint_every=100)
        cfg = toy_config(datalist, tmp / name, total_steps=STEPS, batch_size=2, **det)
        cfg.to_yaml(tmp / f"{name}.yaml")
        out[name] = tmp / f"{name}.yaml"
    out["tmp"] = tmp
    return out


def test_gloo_template_trains_two_ranks(slurm_cluster: LocalSlurm, configs: dict[str, Path]) -> None:
    tmp = configs["tmp"]
    job = _submit(slurm_cluster, configs["plain"], tmp / "plain.log")
    state = slurm_cluster.wait_job(job, timeout=240)
    log = (tmp / "plain.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    ckpt = load_checkpoint(tmp / "plain" / "checkpoints" / "last.pt")
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2  # a Gloo group of 2 ranks
    assert [r["data"]["rank"] for r in ckpt["ranks"]] == [0, 1]
    assert sorted(_losses(tmp / "plain")) == list(range(1, STEPS + 1))  # rank 0 alone writes metrics


def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster: LocalSlurm, configs: dict[str, Path]) -> None:
    tmp, out = configs["tmp"], configs["tmp"] / "preempted"
    job = _submit(slurm_cluster, configs["preempted"], tmp / "preempted.log", TOY_DELAY_S="0.5")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and 2 in _losses(out)):
        time.sleep(0.2)
    assert 2 in _losses(out), (tmp / "preempted.log").read_text()[-3000:]
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T sends
    # the job checkpoints, exits 75 on every rank and requeues itself; a requeued job waits ~2 min for its
    # BeginTime: the test lets it start soon (a real preemption waits anyway; start_requeued avoids slurmd's
    # "Job credential revoked" for a start within the same second)
    slurm_cluster.start_requeued(job, timeout=180)  # raises (with the logs) when it was not requeued
    log_text = lambda: (tmp / "preempted.log").read_text()  # noqa: E731
    state = slurm_cluster.wait_job(job, timeout=240)
    assert state == "COMPLETED", log_text()[-4000:]
    text = log_text()
    assert "preempted by SIGTERM" in text and "requeueing" in text, text[-3000:]  # scancel → steps
    stopped = int(text.split("checkpoint written at step ")[1].split()[0])
    assert 2 <= stopped < STEPS
    assert "resumed from" in text
    got, want = _losses(out), _losses(tmp / "plain")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in want.items():  # the same losses as the uninterrupted job, step by step
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    a = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp / "plain" / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)
