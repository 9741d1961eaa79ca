"""A whole study counted and timed before it runs (medssl/engines/studies/estimate.py, ``medssl sweep --dry-run``):
every child of the sweep, its counts as its run would make them, one timed child per cost shape, the pretraining,
finished children (and pretraining) left out of what remains, nothing trained or tracked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from medssl.cli import app
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.estimate import run_counts
from medssl.engines.studies.estimate import estimate_sweep
from medssl.engines.studies.pipeline import load_pipeline
from tests.engines.conftest import TOYS
from tests.engines.finetune.test_self_training import SEG_NET, synthetic_cases


def _pipeline(tmp: Path) -> dict[str, Any]:
    dl, sp = synthetic_cases(tmp / "data")
    return {
        "study": "est", "experiment": "est", "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        "out_dir": str(tmp / "runs"), "data": {"datalist": str(dl), "splits": str(sp)},
        "pretrain": {"method": f"{TOYS}:toy_method", "encoder": f"{TOYS}:tiny_encoder", "augment": f"{TOYS}:toy_augment",
                     "roi_size": [8, 8, 8], "batch_size": 2, "total_steps": 6, "checkpoint_every": 3,
                     "preview": False, "device": "cpu"},
        "finetune": {"task": "segmentation", "network": "SegResNet", "network_kwargs": SEG_NET, "out_channels": 2,
                     "roi_size": [8, 8, 8], "normalisation": "none", "batch_size": 2, "num_samples": 1,
                     "max_steps": 4, "val_every_steps": 2, "sw_overlap": 0.0, "sw_batch_size": 1, "device": "cpu",
                     "augment": {"flip_prob": 0.0}, "tta": False},
        "finetune_by_fraction": {100: {"batch_size": 3}},  # a second cost shape
        "fractions": [20, 100], "inits": ["scratch", "ssl"], "seeds": [0, 1],
        "self_training": {"inits": ["scratch"], "fractions": [20], "tta": False},
    }


def _child_seconds(t: dict[str, float], c: Any) -> float:
    return (t["setup"] + c.cases.get("pseudo", 0) * t["eval_case"] + c.total_steps * t["step"]
            + c.validations * c.cases["validation"] * t["eval_case"] + c.cases["test"] * t["eval_case"])


def test_every_child_counted_one_timing_per_shape_and_what_remains(tmp_path: Path) -> None:
    spec = _pipeline(tmp_path)
    est = estimate_sweep(spec, time_steps=2)
    pl = load_pipeline(spec)
    sweep = tmp_path / "runs" / "est" / "sweep"
    assert not (tmp_path / "mlruns.db").exists() and not sweep.exists()  # nothing tracked, no run folder
    assert [(c.fraction, c.init, c.seed) for c in est.children] == pl.children()  # 8 children + 2 students
    assert [c.key for c in est.children][-2:] == ["f20-scratch+st-s0", "f20-scratch+st-s1"]
    assert len(est.shapes) == 2 and {c.shape for c in est.children if c.fraction == 100} == {1}
    assert est.shapes[0]["timed_child"] == "f20-scratch-s0" and est.shapes[1]["fields"]["batch_size"] == 3
    for c in est.children:  # counts = the run's own (the student: its pool and its longer epoch)
        cfg = {**spec["finetune"], **({"batch_size": 3} if c.fraction == 100 else {}),
               "datalist": spec["data"]["datalist"], "splits": spec["data"]["splits"], "fraction": c.fraction,
               "seed": c.seed, "out_dir": str(tmp_path / "x")}
        if "+st" in c.init:
            cfg["self_training"] = {"teacher": "-", "tta": False}
        counts = run_counts(FinetuneConfig.from_dict(cfg))
        assert (c.cases, c.total_steps, c.validations) == (counts["cases"], 4, 2) and c.status == "todo"
        assert c.seconds == pytest.approx(_child_seconds(est.shapes[c.shape]["timing"], c))
    assert all("pseudo" in c.cases for c in est.children[-2:]) and "pseudo" not in est.children[0].cases
    p = est.pretrain
    assert p["status"] == "todo" and p["estimate"]["total_steps"] == 6 and p["estimate"]["checkpoints"] == 2
    total = sum(c.seconds for c in est.children) + p["seconds"]
    assert est.total_s == pytest.approx(total) and est.remaining_s == pytest.approx(total)
    assert any("scratch twins" in n for n in est.notes)

    # a resumed study: finished children and the finished pretraining cost nothing more
    for key in ("pretrain", "f20-scratch-s0", "f100-ssl-s1"):
        (sweep / key).mkdir(parents=True)
        (sweep / key / "sweep_child.json").write_text(json.dumps({"status": "FINISHED"}))
    (sweep / "f20-ssl-s0").mkdir()
    (sweep / "f20-ssl-s0" / "sweep_child.json").write_text(json.dumps({"status": "RUNNING"}))
    again = estimate_sweep(spec, time_steps=1)
    done = {c.key: c for c in again.children if c.status == "FINISHED"}
    assert set(done) == {"f20-scratch-s0", "f100-ssl-s1"} and again.pretrain["status"] == "FINISHED"
    assert again.remaining_s == pytest.approx(sum(c.seconds for c in again.children if c.key not in done))
    assert any("counted in full" in n for n in again.notes)


def test_scratch_only_study_has_no_pretraining(tmp_path: Path) -> None:
    spec = _pipeline(tmp_path) | {"inits": ["scratch"], "fractions": [100], "seeds": [0], "self_training": None}
    est = estimate_sweep(spec, time_steps=1)
    assert est.pretrain is None and [c.key for c in est.children] == ["f100-scratch-s0"]
    assert est.total_s == pytest.approx(est.children[0].seconds)


def test_cli_sweep_dry_run(tmp_path: Path) -> None:
    spec = _pipeline(tmp_path) | {"inits": ["scratch"], "self_training": None}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--time-steps", "1", "--json",
                                   str(tmp_path / "est.json")])
    assert res.exit_code == 0, res.output
    assert "whole study" in res.output and "f20 scratch" in res.output and "f100 scratch" in res.output
    saved = json.loads((tmp_path / "est.json").read_text())
    assert len(saved["children"]) == 4 and saved["pretrain"] is None
    assert not (tmp_path / "mlruns.db").exists()
