from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from medssl.demo import default_sample_dir, run_demo


def _check_common(res: dict, console: Console) -> None:
    dl = json.loads(res["hippocampus"].datalist.read_text())
    assert len(dl["training"]) == 40 and len(dl["unlabeled"]) == 20
    assert res["ct"].counts["unlabeled"] == 1
    splits = json.loads(Path(res["splits"]).read_text())
    assert set(splits["seeds"]) == {"0", "1"}
    assert "demo finished" in console.export_text()
    pre = res["pretrain"]
    assert len(pre.loss_history) == 3 and pre.encoder_path.is_file() and pre.run_id


def test_demo_sample_ships_with_license_and_runs(tmp_path: Path) -> None:
    """CI-sized: ingest + split + pretraining (the sweep path is covered by tests/test_sweep.py)."""
    readme = (default_sample_dir() / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Apache" in readme
    console = Console(record=True, width=120)
    res = run_demo(tmp_path / "demo", console=console, pretrain_steps=3, finetune_steps=0,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    _check_common(res, console)
    assert "sweep" not in res


@pytest.mark.slow
def test_demo_whole_story(tmp_path: Path) -> None:
    """What `make demo` runs, with tiny step counts: … → sweep (2 fractions × 2 inits) → compare."""
    console = Console(record=True, width=120)
    res = run_demo(tmp_path / "demo", console=console, pretrain_steps=3, finetune_steps=2,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    _check_common(res, console)
    sweep, comparison = res["sweep"], res["compare"]
    assert [c.status for c in sweep.children] == ["FINISHED"] * 4, sweep.children
    assert {(r["fraction"], r["init"]) for r in comparison.records} == {(25, "scratch"), (25, "ssl"),
                                                                       (100, "scratch"), (100, "ssl")}
    assert comparison.png_path.is_file() and comparison.csv_path.is_file()
