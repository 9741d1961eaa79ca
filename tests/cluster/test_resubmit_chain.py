"""A resubmitted pretraining job keeps the sweep going (issue 11): a tiny ``--slurm`` study whose jobs may not be
requeued (``--no-requeue``) gets the preemption signal in its pretraining twice; each time ``launch.sh`` resubmits
the job (a new id) and moves the finetuning array's ``afterok`` to it, so the array runs after the third job and
every child finishes. ``medssl sweep FILE`` follows the chain meanwhile, and the pretraining's losses equal an
uninterrupted run's step by step. (Before the fix the array sat in ``DependencyNeverSatisfied`` for ever.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from medssl.cluster.sweep_jobs import active_jobs, emit_sweep_jobs, status_table
from medssl.config import PretrainConfig
from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.studies.sweep import run_sweep
from medssl.tracking.mlflow_tracker import make_client
from tests.cluster._slurm import LocalSlurm, log_tails, wait_for

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
SLOW = "tests.cluster._slow"
STEPS, DELAY_S = 12, 0.4  # ~0.45 s a step: the signal lands mid-run (stops near steps 3 and 6 of 12)


def _losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _status_text(study: Path) -> str:
    console = Console(record=True, width=220)
    console.print(status_table(study))
    return console.export_text()


def _preempt_and_follow(cluster: LocalSlurm, logs: Path, out: Path, job: str, stopped: int, *,
                        first: bool) -> tuple[str, int]:
    """Signal pretraining ``job`` once it trained 2 steps past ``stopped`` (a resubmitted job: after resuming);
    wait until it resubmitted itself and moved the array to the new job, and ended FAILED with exit 75.
    Returns ``(new job id, step of its checkpoint)``."""

    def text() -> str:
        log = next(iter(logs.glob(f"hippo-chain-pretrain-{job}_*.out")), None)
        return log.read_text(errors="replace") if log else ""

    def all_logs() -> str:
        return log_tails(logs)

    wait_for(lambda: max(_losses(out), default=0) >= stopped + 2 and (first or "resumed from" in text()), 240,
             lambda: f"job {job} made no progress\n{all_logs()}")
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T sends
    found = wait_for(lambda: re.search(r"Submitted batch job (\d+)", text()), 120, all_logs)
    new = found.group(1)  # type: ignore[union-attr]
    wait_for(lambda: f"now waits on {new} instead of {job}" in text(), 60, all_logs)
    assert cluster.wait_job(job, timeout=120, states=("FAILED",)) == "FAILED", all_logs()
    assert cluster.job_field(job, "ExitCode") == "75:0"  # stopped for preemption, continued as `new`
    step = re.search(r"checkpoint written at step (\d+)", text())
    assert step and stopped < int(step.group(1)) < STEPS, text()[-3000:]
    return new, int(step.group(1))


@pytest.mark.timeout(600)
def test_resubmitted_pretraining_keeps_the_array_dependency(
    slurm_env: LocalSlurm, study_spec: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the jobs import tests.cluster._slow
    study = study_spec("hippo-chain", pretrain={
        "method": f"{SLOW}:slow_simclr", "augment": f"{SLOW}:simclr_augment", "total_steps": STEPS,
        "method_kwargs": {"hidden_dim": 8, "out_dim": 4, "delay_s": DELAY_S}})  # fmt: skip
    root = tmp_path / "runs" / "hippo-chain"
    jobs = emit_sweep_jobs(study, submit=True, sbatch_options=["--no-requeue"])  # scontrol requeue is refused
    first, array = jobs.pretrain_job, jobs.children_job
    assert first and array
    logs, out = root / "slurm" / "logs", root / "sweep" / "pretrain"
    all_logs = lambda: log_tails(logs)  # noqa: E731
    dependency = lambda: slurm_env.job_field(f"{array}_0", "Dependency")  # noqa: E731
    assert dependency().startswith(f"afterok:{first}"), dependency()

    chain, stopped = [first], 0
    for _ in range(2):  # two resubmissions in a row: 1st → 2nd → 3rd job
        new, stopped = _preempt_and_follow(slurm_env, logs, out, chain[-1], stopped, first=chain[-1] == first)
        assert dependency().startswith(f"afterok:{new}"), dependency()  # the whole array moved, not one task
        assert slurm_env.job_field(f"{array}_1", "Dependency") == dependency()
        chain.append(new)
        if slurm_env.job_state(new) in ("PENDING", "RUNNING"):  # `medssl sweep FILE` while the chain runs
            status = _status_text(study)
            assert f"{new} (resubmitted from {first})" in status, status
            assert new in active_jobs(study)
    assert len(set(chain)) == 3

    assert slurm_env.wait_job(chain[-1], timeout=240) == "COMPLETED", all_logs()
    assert slurm_env.wait_job(array, timeout=400) == "COMPLETED", all_logs()  # afterok on the 3rd job fired
    assert not active_jobs(study)
    last_log = next(logs.glob(f"hippo-chain-pretrain-{chain[-1]}_*.out")).read_text()
    assert "resumed from" in last_log and "Submitted batch job" not in last_log, last_log[-3000:]

    client = make_client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    parent = client.get_run(jobs.parent_run_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{jobs.parent_run_id}'")
    assert sorted(r.data.tags.get("medssl.sweep_key") for r in kids) == ["f100-scratch-s0", "f100-ssl-s0", "pretrain"]
    assert all(r.info.status == "FINISHED" for r in kids), [(r.data.tags, r.info.status) for r in kids]

    # the pretraining stopped twice equals the same run without interruption (in process, no tracking)
    cfg = PretrainConfig.from_yaml(out / "config.yaml")
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "reference"), experiment=None,
                              method_kwargs={**cfg.method_kwargs, "delay_s": 0.0})  # the sleep changes no number
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job ran (OMP_NUM_THREADS=1)
    try:
        run_pretraining(cfg, progress=False, preemption=False)
    finally:
        torch.set_num_threads(threads)
    got, want = _losses(out), _losses(tmp_path / "reference")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)

    res = run_sweep(study)  # `medssl sweep FILE` afterwards: nothing runs again, the parent is closed
    assert {c.status for c in res.children} == {"SKIPPED"}
    assert client.get_run(jobs.parent_run_id).info.status == "FINISHED"
