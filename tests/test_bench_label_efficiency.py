"""benchmarks/label_efficiency.py's Markdown report: the scratch / SSL table, and a second one for the
self-training arms with their paired differences to scratch."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from medssl.tracking.compare import summarise

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _records() -> list[dict]:
    vals = {"scratch": (0.80, 0.82), "ssl": (0.81, 0.82), "scratch+st": (0.83, 0.84)}
    out = [{"fraction": 10.0, "init": i, "seed": s, "value": v[s], "status": "ok"} for i, v in vals.items() for s in (0, 1)]
    return out + [{"fraction": 100.0, "init": i, "seed": s, "value": 0.87, "status": "ok"}
                  for i in ("scratch", "ssl") for s in (0, 1)]


def test_report_has_a_students_table_with_paired_differences() -> None:
    recs = _records()
    res = SimpleNamespace(study="toy", metric="test_dice_mean", parent_run_id="p", summaries=summarise(recs), records=recs,
                          efficiency=None)
    md = bench.report([res], pipeline=Path("pipelines/x.yaml"), seconds=None)
    assert "| fraction % | scratch+st | scratch+st − scratch (paired) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 10 | 0.8350"))
    assert "0.0250 ± " in row  # +0.03 and +0.02 over scratch
    assert "| 100 | 2 |" in md and not any(line.startswith("| 100 | 0.") for line in md.splitlines())


def test_report_without_students_has_no_second_table() -> None:
    recs = [r for r in _records() if r["init"] != "scratch+st"]
    res = SimpleNamespace(study="toy", metric="test_dice_mean", parent_run_id="p", summaries=summarise(recs), records=recs,
                          efficiency=None)
    assert "scratch+st" not in bench.report([res], pipeline=Path("x.yaml"), seconds=None)
