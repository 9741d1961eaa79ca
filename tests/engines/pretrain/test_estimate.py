"""A pretraining run timed without running it (medssl/engines/pretrain/estimate.py, ``medssl pretrain --dry-run``):
the counts are the run's (steps, probes, checkpoints), the time adds up from what was measured, nothing is written,
and what the run refuses is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medssl.cli import app
from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.pretrain.estimate import checkpoint_count, estimate_pretraining
from medssl.errors import MedsslError
from tests.engines.conftest import toy_config
from tests.engines.pretrain.test_monitor import _write_seg_datalist


@pytest.fixture(scope="module")
def seg_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_seg_datalist(tmp_path_factory.mktemp("seg"))


def test_estimate_counts_as_the_run_and_adds_up(seg_datalist: Path, tmp_path: Path) -> None:
    cfg = toy_config(seg_datalist, tmp_path / "run", total_steps=10, monitor_every=4, checkpoint_every=5)
    est = estimate_pretraining(cfg, time_steps=2, warmup_steps=1)
    assert not (tmp_path / "run").exists()
    res = run_pretraining(cfg, progress=False)
    assert est.total_steps == 10 == len(res.loss_history) == res.timing["steps"]  # the run measures what was estimated
    assert res.timing["s_per_step"] == pytest.approx(res.timing["train_s"] / 10) and res.timing["handlers_s"] > 0
    assert est.probes == len(res.monitor_history) == 3  # steps 0, 4, 8
    assert est.checkpoints == 2 and est.pool == 8  # steps 5, 10; the test case is not pooled
    t = est.timing
    assert t["steps_timed"] == 2 and min(t["step"], t["probe"], t["checkpoint"], t["setup"]) > 0
    assert t["training"] == pytest.approx(10 * t["step"])
    assert t["monitor"] == pytest.approx(3 * t["probe"]) and t["checkpointing"] == pytest.approx(2 * t["checkpoint"])
    assert t["total"] == pytest.approx(t["setup"] + t["training"] + t["monitor"] + t["checkpointing"])
    assert est.config["out_dir"] == str(tmp_path / "run") and est.config["in_channels"] == 1
    assert est.parameters > 0 and est.machine["cpu_capability"]


def test_epochs_and_monitor_off(seg_datalist: Path, tmp_path: Path) -> None:
    est = estimate_pretraining(toy_config(seg_datalist, tmp_path / "e", total_steps=0, epochs=3), time_steps=1)
    assert est.epoch_length == 4 and est.total_steps == 12  # 8 volumes, batch 2
    assert est.probes == 0 and est.checkpoints == 1 and est.timing["monitor"] == 0  # only the last step's


def test_checkpoint_count_follows_the_saver(seg_datalist: Path, tmp_path: Path) -> None:
    assert [checkpoint_count(7, 3), checkpoint_count(6, 3), checkpoint_count(5, 0)] == [3, 2, 1]
    res = run_pretraining(toy_config(seg_datalist, tmp_path / "r", total_steps=7, checkpoint_every=3,
                                     keep_checkpoints=5), progress=False)
    assert len(res.checkpoints) == checkpoint_count(7, 3)  # steps 3, 6 and 7


def test_what_the_run_refuses_is_refused(tmp_path: Path) -> None:
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "unlabeled": []}))
    with pytest.raises(MedsslError):
        estimate_pretraining(toy_config(tmp_path / "datalist.json", tmp_path / "r"), time_steps=1)
    with pytest.raises(ValueError, match="time_steps"):
        estimate_pretraining(toy_config(tmp_path / "datalist.json", tmp_path / "r"), time_steps=0)


def test_cli_pretrain_dry_run(seg_datalist: Path, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(toy_config(seg_datalist, tmp_path / "run", total_steps=7).to_dict()))
    res = CliRunner().invoke(app, ["pretrain", "-c", str(path), "--dry-run", "--time-steps", "1",
                                   "--json", str(tmp_path / "est.json")])
    assert res.exit_code == 0, res.output
    assert "7 steps" in res.output and "total" in res.output
    assert json.loads((tmp_path / "est.json").read_text())["total_steps"] == 7
    assert not (tmp_path / "run").exists()
