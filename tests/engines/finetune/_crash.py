"""Interrupt a finetuning run at an epoch start, as a crash would, for the exact-resume tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.engines.finetune import Finetuner, run_finetune
from medssl.engines.finetune.config import FinetuneConfig

__all__ = ["crash_at_epoch"]


def crash_at_epoch(cfg: FinetuneConfig, epoch: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``cfg`` until epoch ``epoch`` (0-based) starts, where a simulated crash stops it; then un-patch.

    Returns:
        The run's ``checkpoints/last.pt`` (written at the end of epoch ``epoch - 1``).
    """
    real = Finetuner.train_epoch

    def crash(self: Finetuner, e: int) -> float:
        if e == epoch:
            raise RuntimeError("simulated crash")
        return real(self, e)

    monkeypatch.setattr(Finetuner, "train_epoch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_finetune(cfg, progress=False)
    monkeypatch.setattr(Finetuner, "train_epoch", real)
    return Path(cfg.out_dir) / "checkpoints" / "last.pt"
