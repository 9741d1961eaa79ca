"""A rank that dies mid-run (issue 11, "Bad input"): 2-rank Gloo pretraining under ``torchrun``, ONE worker SIGKILLed
after the first checkpoint. torchrun must end within a bounded time with a non-zero exit (no rank left hanging in
a collective), the last checkpoint must load, and a 2-rank resume from it must end with the losses of an
uninterrupted run. The subprocess waits have generous timeouts, so a hang fails the test instead of blocking CI.

The victim is rank 1 (the survivor, rank 0, is the one writing checkpoints, blocked in the next all-reduce when its
peer dies) or rank 0 (the writer dies; rank 1 is the one left waiting).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.engines.runtime.checkpoint import load_checkpoint
from tests.engines.conftest import toy_config
from tests.engines.pretrain.test_ddp import _children, _free_port

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with Gloo",
)
STEPS, CKPT = 6, 2
#: torchrun must have exited this long after the kill (observed: a few seconds)
FAIL_FAST_S = 60.0


def _torchrun(cfg: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "medssl.cli", "pretrain", "--config", str(cfg), *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    with log.open("w") as f:  # the child holds its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT)


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The worker process of global ``rank`` (``RANK`` in its environment)."""
    for pid in _children(torchrun.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun.pid}")


def _alive(pid: int) -> bool:
    """A running (not zombie) process ``pid``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines if x.endswith("}")}


def _cfg(datalist: Path, out: Path):
    det = dict(augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0}, checkpoint_every=CKPT)
    return toy_config(datalist, out, total_steps=STEPS, batch_size=2, **det)


@pytest.fixture(scope="module")
def reference(tiny_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("rank_death_ref")
    _cfg(tiny_datalist, tmp / "ref").to_yaml(tmp / "ref.yaml")
    p = _torchrun(tmp / "ref.yaml", tmp / "ref.log")
    assert p.wait(timeout=240) == 0, (tmp / "ref.log").read_text()[-3000:]
    return _losses(tmp / "ref")


@pytest.mark.parametrize("victim", [1, 0])
def test_dead_rank_fails_fast_and_checkpoint_resumes(victim: int, tiny_datalist: Path, tmp_path: Path,
                                                     reference: dict[int, float]) -> None:
    out = tmp_path / "run"
    _cfg(tiny_datalist, out).to_yaml(tmp_path / "run.yaml")
    proc = _torchrun(tmp_path / "run.yaml", tmp_path / "killed.log", env={"TOY_DELAY_S": "0.3"})
    first = out / "checkpoints" / f"step_{CKPT:07d}.pt"
    try:
        deadline = time.monotonic() + 180
        # past the first checkpoint and inside a later step: step CKPT + 1 logged (every forward sleeps TOY_DELAY_S)
        while not (first.exists() and max(_losses(out), default=0) > CKPT) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists() and proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(_rank_pid(proc, victim), signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = proc.wait(timeout=FAIL_FAST_S + 60)  # generous: a hang fails here instead of blocking CI
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun still running {FAIL_FAST_S + 60:.0f} s after rank {victim} was killed (hang)")
        waited = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:  # never leave workers behind
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    log = (tmp_path / "killed.log").read_text()
    assert rc != 0, log[-3000:]
    assert waited < FAIL_FAST_S, f"torchrun took {waited:.1f} s to fail after the kill"
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived torchrun"
    logging.getLogger(__name__).info("torchrun failed %.1f s after rank %d was killed", waited, victim)
    # the last checkpoint is intact (written atomically) and from before the kill
    last = out / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert CKPT <= ckpt["step"] < STEPS and ckpt["world_size"] == 2
    assert max(_losses(out)) < STEPS  # really interrupted
    resumed = _torchrun(tmp_path / "run.yaml", tmp_path / "resumed.log", "--resume", str(last))
    assert resumed.wait(timeout=240) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in reference.items():  # same losses as the uninterrupted run
        assert abs(got[step] - want) <= 1e-6, (step, got[step], want)
