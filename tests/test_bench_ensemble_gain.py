"""benchmarks/ensemble_gain.py: the paired ensemble − reference arithmetic of its report, and an end-to-end run on
two tiny real finetuned runs laid out as a study's sweep folder (each arm alone, then `predict`'s ensemble)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.deploy._finetuned import finetune_seg

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_ensemble_gain", REPO / "benchmarks" / "ensemble_gain.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_report_pairs_the_ensemble_with_the_first_arm() -> None:
    rows = {0: {"scratch": 0.80, "ssl": 0.79, "ensemble": 0.83, "cases": 40},
            1: {"scratch": 0.82, "ssl": 0.84, "ensemble": 0.84, "cases": 40}}
    md = bench.report(rows, ["scratch", "ssl"], fraction=5, which="test")
    assert md.splitlines()[0] == "| 5 %, test cases | scratch | ssl | ensemble | ensemble − scratch |"
    assert "| seed 0 (40) | 0.8000 | 0.7900 | 0.8300 | +0.0300 |" in md
    last = md.splitlines()[-1]
    assert last.startswith("| mean ± 95 % CI | 0.8100 ± ") and "| 0.0250 ± " in last


def test_end_to_end_on_two_real_runs(hippocampus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for arm, kw in (("scratch", {}), ("ssl", {"lr": 3e-2, "max_steps": 4})):
        _, out = finetune_seg(hippocampus_dir, tmp_path / arm, **kw)
        shutil.move(out, sweep / f"f100-{arm}-s0")
    md = bench.main([str(sweep), "--fraction", "100", "--arms", "scratch", "ssl", "--seeds", "0",
                     "--workdir", str(tmp_path / "work")])
    assert "| seed 0 (" in md and md in capsys.readouterr().out
    report = json.loads((tmp_path / "work" / "s0" / "ensemble" / "predict_report.json").read_text())
    assert len(report["model"]) == 2 and report["ok"] >= 1
    test_ids = {p.name[: -len(".nii.gz")] for p in (tmp_path / "work" / "s0" / "inputs").iterdir()}
    assert {c["case"] for c in report["cases"]} == test_ids
    with pytest.raises(SystemExit, match="no finished child"):
        bench.main([str(sweep), "--fraction", "100", "--arms", "scratch", "ssl", "--seeds", "1"])
