from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from medssl.demo import default_sample_dir, run_demo


def test_demo_sample_ships_with_license_and_runs(tmp_path: Path) -> None:
    sample = default_sample_dir()
    readme = (sample / "README.md").read_text()
    assert "CC-BY-SA 4.0" in readme and "Apache" in readme
    console = Console(record=True, width=120)
    res = run_demo(tmp_path / "demo", console=console, pretrain_steps=3,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    dl = json.loads(res["hippocampus"].datalist.read_text())
    assert len(dl["training"]) == 40 and len(dl["unlabeled"]) == 20
    assert res["ct"].counts["unlabeled"] == 1
    splits = json.loads(Path(res["splits"]).read_text())
    assert set(splits["seeds"]) == {"0", "1"}
    assert "demo finished" in console.export_text()
    pre = res["pretrain"]
    assert len(pre.loss_history) == 3 and pre.encoder_path.is_file() and pre.run_id
