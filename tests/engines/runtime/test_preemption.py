"""Preemption without SLURM: a real SIGUSR1 / SIGTERM sent to the training process mid-run → checkpoint at the
next step boundary, ``Preempted`` (CLI exit code 75), and a resume (``"auto"``) that reproduces the
uninterrupted run's losses exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.runtime.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler
from tests.engines.conftest import toy_config
from tests.engines.finetune.test_engine import adrenal  # noqa: F401, F811 (fixture)

REPO = Path(__file__).resolve().parents[3]
STEPS = 8


def _cfg(datalist: Path, out: Path, **kw):
    det = dict(augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0}, checkpoint_every=100)
    return toy_config(datalist, out, **{"total_steps": STEPS, **det, **kw})


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _signal_when(out: Path, step: int, signum: int, pid: int) -> threading.Thread:
    """Send ``signum`` to ``pid`` once ``metrics.jsonl`` holds step ``step`` (i.e. mid-run)."""

    def go() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and step in _losses(out):
                os.kill(pid, signum)
                return
            time.sleep(0.02)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_handler_records_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as pre:
        assert not pre.requested and not pre.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        assert pre.requested and pre.signum == signal.SIGUSR1
        assert pre.should_stop(any_rank=lambda flag: flag)
        assert not pre.should_stop(any_rank=lambda flag: False)  # the collective decides under DDP
    assert signal.getsignal(signal.SIGUSR1) == before  # restored: no lasting global state
    err = Preempted(signal.SIGUSR1, 3, "x/last.pt")
    assert err.exit_code == EXIT_PREEMPTED == 75 and "SIGUSR1" in str(err) and "step 3" in str(err)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_mid_run_checkpoints_at_next_step_and_resume_is_exact(
    tiny_datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    ref = run_pretraining(_cfg(tiny_datalist, tmp_path / "ref"), progress=False, preemption=False)
    cfg, before = _cfg(tiny_datalist, tmp_path / "pre"), signal.getsignal(signum)
    monkeypatch.setenv("TOY_DELAY_S", "0.15")  # steps slow enough for the signal to land mid-run
    sender = _signal_when(tmp_path / "pre", 2, signum, os.getpid())
    with pytest.raises(Preempted) as info:
        run_pretraining(cfg, progress=False)
    sender.join()
    stopped = info.value.step
    assert 2 <= stopped < STEPS  # the step during which it arrived finished, no further one began
    ckpt = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    assert ckpt["step"] == stopped and max(_losses(tmp_path / "pre")) == stopped
    assert signal.getsignal(signum) == before  # run_pretraining restored the handler
    monkeypatch.delenv("TOY_DELAY_S")
    res = run_pretraining(cfg, resume="auto", progress=False)  # what the requeued job runs
    assert [s for s, _ in res.loss_history] == list(range(stopped + 1, STEPS + 1))
    got, want = _losses(tmp_path / "pre"), dict(ref.loss_history)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=0, abs=1e-6), step


def test_cli_exits_75_on_sigusr1(tiny_datalist: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_datalist, tmp_path / "cli")
    cfg.to_yaml(tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOY_DELAY_S": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "medssl.cli", "pretrain", "--config", str(tmp_path / "cfg.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _signal_when(tmp_path / "cli", 2, signal.SIGUSR1, proc.pid).join()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    assert "preempted by SIGUSR1" in out
    assert load_checkpoint(tmp_path / "cli" / "checkpoints" / "last.pt")["step"] >= 2


def test_finetune_signal_mid_epoch_resumes_from_epoch_start_exactly(
    adrenal, tmp_path: Path, monkeypatch  # noqa: F811
) -> None:
    """Finetuning's granularity is the epoch: a signal inside epoch 1 stops before the next step, keeps the
    epoch-0 ``last.pt`` (no new checkpoint), and the resumed run equals a straight one."""
    import torch

    from medssl.engines.finetune.engine import Finetuner, run_finetune
    from tests.engines.finetune.test_engine import cls_config

    straight = run_finetune(cls_config(adrenal, tmp_path / "straight", fraction=25, max_epochs=3), progress=False,
                            preemption=False)
    cfg = cls_config(adrenal, tmp_path / "pre", fraction=25, max_epochs=3)
    real = Finetuner.train_step

    def step_then_signal(self: Finetuner, batch):
        out = real(self, batch)
        if self.step == 3:  # the first step of epoch 1 (2 steps per epoch) just finished
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Finetuner, "train_step", step_then_signal)
    with pytest.raises(Preempted, match="epoch 1"):
        run_finetune(cfg, progress=False)
    last = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 2  # epoch 0's end: steps 3.. are redone on resume
    monkeypatch.setattr(Finetuner, "train_step", real)
    resumed = run_finetune(cfg, resume="auto", progress=False)
    a = load_checkpoint(straight.out_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6 and resumed.epochs_run == 3
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, nan_ok=True)
