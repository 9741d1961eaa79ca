"""A run planned and timed without running it (medssl/engines/finetune/estimate.py, ``medssl finetune --dry-run``):
the estimate resolves the config exactly as the run does, counts its cases, steps and validations as the run
will, refuses what the run refuses (before timing), writes nothing, and its time adds up from what it measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from medssl.cli import app
from medssl.engines.finetune import Finetuner, run_finetune
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.estimate import estimate_run, validation_count
from medssl.engines.finetune.pseudo import labelled_repeats, pool_ids
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.errors import MedsslError
from tests.engines.finetune.test_engine import adrenal, cls_config  # noqa: F401 - the fixture
from tests.engines.finetune.test_self_training import _cfg, synthetic_cases


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return synthetic_cases(tmp_path_factory.mktemp("est"))


@pytest.fixture(scope="module")
def teacher(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_finetune(_cfg(data, tmp_path_factory.mktemp("teacher") / "run", max_steps=4), progress=False).best_checkpoint


def test_validation_count_follows_the_run() -> None:
    assert validation_count(2400, 2, val_every_steps=200, val_every=1) == 12  # 200 … 2,200 + the end
    assert validation_count(2400, 2, val_every_steps=300, val_every=1) == 8  # 300 … 2,100 + the end
    assert validation_count(5, 2, val_every_steps=None, val_every=1) == 3  # epochs 1, 2, 3
    assert validation_count(5, 2, val_every_steps=None, val_every=2) == 2  # epoch 2 + the last (3)
    assert validation_count(8, 2, val_every_steps=None, val_every=2) == 2  # epochs 2 and 4 (the last)


def test_estimate_resolves_counts_and_times_as_the_run(data, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "run", fraction=100, max_steps=5, val_every_steps=2)
    est = estimate_run(cfg, time_steps=3, warmup_steps=1, eval_cases=2)
    assert not (tmp_path / "run").exists()  # nothing written where the run would write
    ft = Finetuner(cfg)
    assert est.cases == {r: len(ft.items[r]) for r in ("training", "validation", "test")}
    assert est.total_steps == 5 and est.steps_per_epoch == ft.steps_per_epoch
    assert est.validations == 3  # steps 2, 4 and the end (5)
    assert est.parameters == sum(p.numel() for p in ft.model.parameters())
    t = est.timing
    assert t["steps_timed"] == 3 and t["eval_cases_timed"] == 2 and min(t["step"], t["eval_case"], t["setup"]) > 0
    assert t["training"] == pytest.approx(5 * t["step"])
    assert t["validation"] == pytest.approx(3 * est.cases["validation"] * t["eval_case"])
    assert t["test"] == pytest.approx(est.cases["test"] * t["eval_case"])
    assert t["total"] == pytest.approx(t["setup"] + t["training"] + t["validation"] + t["test"])
    assert "labelling" in t and t["labelling"] == 0 and "teacher_case" not in t
    assert est.machine["cpu_capability"] and est.device == "cpu"
    res = run_finetune(cfg, progress=False)  # the config the run resolves and records is the one the estimate shows
    assert est.config == FinetuneConfig.from_yaml(tmp_path / "run" / "config.yaml").to_dict()
    # and the run measures what the estimate predicts: the same steps and validations, seconds of each
    assert (res.timing["steps"], res.timing["validations"]) == (est.total_steps, est.validations)
    assert res.timing["s_per_step"] == pytest.approx(res.timing["train_s"] / 5) and res.timing["validation_s"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["timing"]["steps"] == 5
    assert json.loads(json.dumps(est.to_dict(), default=str))["total_steps"] == 5


def test_epoch_schedule_and_early_stopping_note(data, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "e", max_steps=0, max_epochs=3, val_every=2, early_stopping_patience=2)
    est = estimate_run(cfg, time_steps=1, warmup_steps=0, eval_cases=5)
    assert est.total_steps == 3 * est.steps_per_epoch and est.validations == 2
    assert est.timing["eval_cases_timed"] == est.cases["validation"]  # at most the validation set
    assert any("upper bound" in n for n in est.notes)


def test_self_training_counts_the_pool_and_times_the_teacher(data, teacher: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "s", self_training={"teacher": str(teacher), "tta": False}, max_steps=0,
               max_epochs=2)
    est = estimate_run(cfg, time_steps=1, warmup_steps=0, eval_cases=1)
    assert not (tmp_path / "s").exists()  # the pool is not labelled, nothing is written
    sp = json.loads(Path(data[1]).read_text())
    ft = Finetuner(cfg.replace(self_training=None))
    labelled = [it["case_id"] for it in ft.items["training"]]
    pool = pool_ids(sp, 0, "seed", labelled)
    assert est.cases["pseudo"] == len(pool)
    r = labelled_repeats(len(labelled), len(pool), 0.5)
    assert est.steps_per_epoch == math.ceil((r * len(labelled) + len(pool)) / 2)  # the student's epoch
    assert est.total_steps == 2 * est.steps_per_epoch
    t = est.timing
    assert t["teacher_case"] > 0 and t["labelling"] == pytest.approx(len(pool) * t["teacher_case"])
    assert t["total"] == pytest.approx(t["setup"] + t["labelling"] + t["training"] + t["validation"] + t["test"])
    assert est.config["self_training"]["teacher"] == str(teacher)


def test_what_the_run_refuses_is_refused_before_timing(data, teacher: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(teacher)  # a teacher of 3 classes for a 2-class run
    ckpt["config"]["out_channels"] = 3
    torch.save(ckpt, tmp_path / "three.pt")
    with pytest.raises(MedsslError, match="3 classes, this run has out_channels=2"):
        estimate_run(_cfg(data, tmp_path / "a", self_training=str(tmp_path / "three.pt")), time_steps=1)
    assert not (tmp_path / "a").exists()
    with pytest.raises(MedsslError, match="batch_size"):  # 20 % of 10 training cases: 2 < batch 5
        estimate_run(_cfg(data, tmp_path / "b", batch_size=5), time_steps=1)
    with pytest.raises(ValueError, match="time_steps"):
        estimate_run(_cfg(data, tmp_path / "c"), time_steps=0)


def test_cli_dry_run_prints_the_estimate_and_writes_only_the_json(data, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "run", max_steps=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    res = CliRunner().invoke(app, ["finetune", "-c", str(path), "--dry-run", "--time-steps", "1",
                                   "--json", str(tmp_path / "est.json")])
    assert res.exit_code == 0, res.output
    assert "total" in res.output and "s/step" in res.output and "4 steps" in res.output
    assert json.loads((tmp_path / "est.json").read_text())["total_steps"] == 4
    assert not (tmp_path / "run").exists()


def test_classification_run_is_estimated(adrenal, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    cfg = cls_config(adrenal, tmp_path / "cls", max_epochs=3)
    est = estimate_run(cfg, time_steps=2, warmup_steps=0, eval_cases=3)
    ft = Finetuner(cfg)
    assert est.plan is None and est.cases == {r: len(ft.items[r]) for r in ("training", "validation", "test")}
    assert est.total_steps == 3 * ft.steps_per_epoch and est.validations == 3
    assert est.timing["eval_cases_timed"] == 3 and est.timing["total"] > est.timing["training"] > 0


def test_an_epoch_without_a_batch_is_an_error_not_a_hang(data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medssl.engines.finetune.estimate as estimate

    monkeypatch.setattr(estimate, "epoch_loader", lambda *a, **k: [])
    with pytest.raises(MedsslError, match="make no batch of 2"):
        estimate_run(_cfg(data, tmp_path / "n"), time_steps=1)
