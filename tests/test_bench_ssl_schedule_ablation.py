"""benchmarks/ssl_schedule_ablation.py: one SSL run per (schedule, fraction, seed), chosen on validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medssl.engines.finetune.result import FinetuneResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ssl_schedule_ablation as abl  # noqa: E402

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "label_efficiency_spark_unet.yaml"


def test_runs_each_schedule_and_reports_validation_and_test(tmp_path: Path, monkeypatch, capsys) -> None:
    seen = []

    def fake_run(cfg, resume=None, progress=True):  # records what the real engine would be given
        seen.append((cfg.ssl_schedule, cfg.fraction, cfg.seed, cfg.init, cfg.max_steps))
        v = 0.8 if cfg.ssl_schedule == "none" else 0.85
        return FinetuneResult(out_dir=Path(cfg.out_dir), best_val={"dice_mean": v}, test_metrics={"dice_mean": v - 0.1})

    monkeypatch.setattr(abl, "run_finetune", fake_run)
    study = tmp_path / "study"
    rc = abl.main([str(PIPELINE), "--study-dir", str(study), "--out", str(tmp_path / "out"), "--fractions", "10",
                   "--seeds", "0", "--scales", "1.0", "--schedules", "none,auto@1"])
    assert rc == 0
    assert [s[:3] for s in seen] == [("none", 10.0, 0), ({"freeze_steps": "auto", "warmup_steps": "auto",
                                                           "encoder_lr_scale": 1.0, "llrd": None}, 10.0, 0)]
    assert all(s[3] == f"ssl:{study / 'sweep' / 'pretrain' / 'encoder.pt'}" and s[4] == 2400 for s in seen)
    out = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert out["validation"] == {"none": {"f10-s0": 0.8}, "auto@1": {"f10-s0": 0.85}}
    assert out["test"]["auto@1"]["f10-s0"] == pytest.approx(0.75)
    text = capsys.readouterr().out
    assert "best validation dice_mean" in text and "| auto@1 | 0.8500 |" in text


def test_unknown_schedule_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        abl.main([str(PIPELINE), "--study-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--schedules", "bogus"])
