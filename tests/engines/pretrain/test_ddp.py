"""DDP pretraining under ``torchrun`` on CPU (Gloo): 2 ranks × B/2 equals 1 process × B, one MLflow run,
rank-0-only outputs, and an exact resume after the workers are killed.

Weight equality needs a forward pass that is a deterministic function of the data: the toy method
(per-sample MSE, dropout off) with the toy augmentation (noise off). The real methods draw random
views from a per-rank generator (``seed + rank``, so ranks see different views) and the contrastive
ones couple samples inside the batch (negatives, BatchNorm statistics), so 2 × B/2 cannot reproduce
1 × B for them bit for bit; their DDP path is the same engine code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.runtime.checkpoint import load_checkpoint
from tests.engines.conftest import toy_config

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with Gloo",
)
STEPS, CKPT = 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "medssl.cli", "pretrain", "--config",
           str(cfg), *extra]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(p: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    rc = p.wait(timeout=timeout)
    assert rc == 0, log.read_text()[-3000:]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}


def _cfg(tiny_datalist: Path, out: Path, **kw):
    det = dict(augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0}, checkpoint_every=CKPT)
    return toy_config(tiny_datalist, out, **{"total_steps": STEPS, **det, **kw})


def _kill_after_checkpoint(proc: subprocess.Popen, ckpt: Path, report: dict) -> None:
    """SIGKILL the workers and torchrun once ``ckpt`` exists, inside the next step."""
    deadline = time.monotonic() + 150
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    report["alive_at_checkpoint"] = proc.poll() is None and ckpt.exists()
    time.sleep(0.4)  # inside step CKPT + 1 (TOY_DELAY_S slows every forward)
    for pid in _children(proc.pid):  # the workers (torchrun starts each in its own session)
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def ddp_run(tiny_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Side by side: 2 ranks × B=2 under torchrun (MLflow on); the same run slowed down and killed
    after its step-CKPT checkpoint; and 1 process × B=4 in this process."""
    tmp = tmp_path_factory.mktemp("ddp")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    cfg = _cfg(tiny_datalist, tmp / "ddp", batch_size=2, experiment="ddp-test", tracking_uri=uri)
    cfg.to_yaml(tmp / "ddp.yaml")
    killed = _cfg(tiny_datalist, tmp / "killed", batch_size=2)
    killed.to_yaml(tmp / "killed.yaml")
    proc = _torchrun(tmp / "ddp.yaml", tmp / "ddp.log")
    victim = _torchrun(tmp / "killed.yaml", tmp / "killed.log", env={"TOY_DELAY_S": "0.3"})
    report: dict = {}
    killer = threading.Thread(
        target=_kill_after_checkpoint,
        args=(victim, tmp / "killed" / "checkpoints" / f"step_{CKPT:07d}.pt", report),
    )
    killer.start()
    single = run_pretraining(_cfg(tiny_datalist, tmp / "single", batch_size=4), progress=False)
    _wait(proc, tmp / "ddp.log")
    killer.join()
    return {"tmp": tmp, "cfg": cfg, "uri": uri, "single": single, "killed": report}


def test_ddp_matches_single_process_and_rank0_writes(ddp_run: dict) -> None:
    from mlflow import MlflowClient

    out = Path(ddp_run["cfg"].out_dir)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "encoder.pt").is_file()
    assert (out / "encoder.json").is_file() and (out / "config.yaml").is_file()
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2
    assert [r["data"]["rank"] for r in ckpt["ranks"]] == [0, 1]
    # the ranks' augmentations were seeded seed + rank: different streams
    gens = [r["augment"]["generator"] for r in ckpt["ranks"]]
    assert not torch.equal(gens[0], gens[1])
    # 2 ranks × B=2 == 1 process × B=4 (same volumes per step; gradients averaged over ranks)
    ref = load_checkpoint(ddp_run["single"].last_checkpoint)["model"]
    for k, v in ckpt["model"].items():
        assert torch.allclose(v, ref[k], atol=1e-5), k
    ddp_losses = _losses(out)
    assert sorted(ddp_losses) == list(range(1, STEPS + 1))  # one metrics line per step: rank 0 only
    for step, loss in ddp_run["single"].loss_history:  # logged loss = mean over ranks = global mean
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    client = MlflowClient(tracking_uri=ddp_run["uri"])
    exp = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, not one per rank
    hist = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, STEPS + 1))
    ledger = json.loads((out / "checkpoints" / "mlflow.json").read_text())  # rank 0's: the one run, every step
    assert ledger["run_id"] == runs[0].info.run_id and ledger["logged"]["loss"] == STEPS
    assert {f.path for f in client.list_artifacts(runs[0].info.run_id, "encoder")} == {
        "encoder/encoder.pt",
        "encoder/encoder.json",
    }


def test_ddp_resume_after_kill_is_exact(ddp_run: dict) -> None:
    tmp = ddp_run["tmp"]
    assert ddp_run["killed"]["alive_at_checkpoint"], (tmp / "killed.log").read_text()[-3000:]
    assert CKPT <= max(_losses(tmp / "killed")) < STEPS  # really interrupted after the checkpoint
    resumed = _torchrun(
        tmp / "killed.yaml", tmp / "resumed.log", "--resume", str(tmp / "killed" / "checkpoints" / "last.pt")
    )
    _wait(resumed, tmp / "resumed.log")
    got, want = _losses(tmp / "killed"), _losses(Path(ddp_run["cfg"].out_dir))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:  # same losses as the uninterrupted DDP run (per-rank RNG and data restored)
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    a = load_checkpoint(tmp / "killed" / "checkpoints" / "last.pt")
    b = load_checkpoint(Path(ddp_run["cfg"].out_dir) / "checkpoints" / "last.pt")
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in b["model"])
    assert [r["data"] for r in a["ranks"]] == [r["data"] for r in b["ranks"]]


# -- in-process pieces of the DDP path (no process group needed) ------------------------------------
def test_crop_batcher_shards_are_disjoint_and_match_one_process() -> None:
    from medssl.engines.pretrain.data import CropBatcher

    data = [{"image": torch.rand(1, 30, 30, 30)} for i in range(8)]
    one = CropBatcher(data, (8, 8, 8), seed=3)
    shards = [CropBatcher(data, (8, 8, 8), seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # across epoch boundaries
        full = one.next_batch(4)
        halves = [s.next_batch(2) for s in shards]
        # a step of B=2 per rank == a step of B=4 in one process: same volumes, same windows
        merged = [halves[0][0], halves[1][0], halves[0][1], halves[1][1]]
        assert all(torch.equal(a, b) for a, b in zip(full, merged, strict=True))
    odd = data[:7]  # 7 volumes on 2 ranks: padded to 8 as DistributedSampler does
    epoch = np.random.default_rng([3, 0]).permutation(7)
    order = [CropBatcher(odd, None, seed=3, rank=r, world_size=2)._order for r in range(2)]
    assert set(order[0]) | set(order[1]) == set(epoch) and len(order[0]) == len(order[1]) == 4
    assert set(order[0]).isdisjoint(order[1][:3])  # disjoint apart from the one padding repeat
    assert shards[1].state_dict() == {
        "epoch": shards[1].epoch,
        "position": shards[1].position,
        "order_seed": 3,
        "rank": 1,
        "world_size": 2,
    }
    with pytest.raises(ValueError, match="rank"):
        CropBatcher(data, None, rank=2, world_size=2)


def test_gathering_kwargs_and_rank_state_selection(caplog: pytest.LogCaptureFixture) -> None:
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.components import method_kwargs_for
    from medssl.engines.runtime.distributed import DistInfo, select_rank_state

    cfg = PretrainConfig(method="simclr", method_kwargs={"temperature": 0.2})
    assert method_kwargs_for(cfg, 1) == {"temperature": 0.2}
    assert method_kwargs_for(cfg, 4) == {"temperature": 0.2, "gather_distributed": True}
    off = cfg.replace(method="vicreg", method_kwargs={"gather_distributed": False})
    assert method_kwargs_for(off, 4) == {"gather_distributed": False}  # an explicit choice wins
    assert "gather_distributed" not in method_kwargs_for(cfg.replace(method="byol"), 4)
    ranks = [{"rng": r, "augment": None, "data": {"epoch": 0, "position": r, "rank": r, "world_size": 2}}
             for r in range(2)]  # fmt: skip
    ckpt = {"rng": 0, "augment": None, "data": ranks[0]["data"], "ranks": ranks}
    assert select_rank_state(ckpt, DistInfo(1, 1, 2)) is ranks[1]
    with caplog.at_level("WARNING", logger="medssl"):
        assert select_rank_state(ckpt, DistInfo(1, 1, 4)) is None  # keeps its fresh seed + rank streams
        assert select_rank_state(ckpt, DistInfo(0, 0, 1))["data"] == {"epoch": 0, "position": 0}
    assert "written by 2 rank(s), resumed on 4" in caplog.text


def test_channels_last_gives_the_same_training(tiny_datalist: Path, tmp_path: Path) -> None:
    runs = [
        run_pretraining(
            _cfg(tiny_datalist, tmp_path / str(cl), total_steps=3, channels_last=cl), progress=False
        )
        for cl in (False, True)
    ]
    for (_, a), (_, b) in zip(runs[0].loss_history, runs[1].loss_history, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    ckpt = load_checkpoint(runs[1].last_checkpoint)["model"]
    ref = load_checkpoint(runs[0].last_checkpoint)["model"]
    assert all(torch.allclose(ckpt[k], ref[k], atol=1e-5) for k in ref)


def test_cpu_bf16_only_with_native_support(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain import components

    cpu = torch.device("cpu")
    monkeypatch.setattr(components, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="medssl"):
        assert components.autocast_for(PretrainConfig(cpu_bf16=True), cpu) is None
    assert "cpu_bf16 ignored" in caplog.text
    monkeypatch.setattr(components, "cpu_has_native_bf16", lambda: True)
    assert components.autocast_for(PretrainConfig(cpu_bf16=True), cpu) == torch.bfloat16
    assert components.autocast_for(PretrainConfig(), cpu) is None
