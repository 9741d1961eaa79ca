"""bundles/ssl_pretrain's `handlers:` list (issue 11, "Bundles that compose"): each handler a `_target_` a user
removes (`_disabled_`), replaces or misspells in an override, with the run's outputs following the list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medssl.bundles.run import run_bundle_config
from medssl.engines.pretrain.events import PretrainHandler
from medssl.errors import MedsslError

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundles" / "ssl_pretrain" / "configs" / "train.yaml"
TINY = {"total_steps": 3, "batch_size": 2, "roi_size": [16, 16, 16], "network_def#init_filters": 8, "lr": 1e-3,
        "warmup_steps": 0, "device": "cpu", "checkpoint_every": 1}


class LossRecorder(PretrainHandler):
    """A user's handler (what `_target_: my_pkg.LossRecorder` builds): one JSON line per event to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def started(self, trainer: Any) -> None:
        self._write({"event": "started", "step": trainer.state.iteration})

    def iteration_completed(self, trainer: Any) -> None:
        self._write({"event": "iteration_completed", "step": trainer.state.iteration, "output": trainer.state.output})

    def completed(self, trainer: Any) -> None:
        self._write({"event": "completed", "step": trainer.state.iteration})


@pytest.fixture(scope="module")
def pool(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datalist of 4 real hippocampus MRI volumes in the unlabeled section."""
    tmp = tmp_path_factory.mktemp("pool")
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[6:10]
    (tmp / "datalist.json").write_text(json.dumps({"unlabeled": [
        {"image": str(p), "case_id": p.name[: -len(".nii.gz")]} for p in images]}))
    return tmp / "datalist.json"


def _handler_index(name: str) -> int:
    """Position of the handler class ``name`` in train.yaml's list (the ids a user types)."""
    listed = [h["_target_"].rsplit(".", 1)[-1] for h in yaml.safe_load(TRAIN.read_text())["handlers"]]
    return listed.index(name)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_the_list_names_the_default_handlers_in_order() -> None:
    listed = [h["_target_"] for h in yaml.safe_load(TRAIN.read_text())["handlers"]]
    assert all(t.startswith("medssl.engines.pretrain.handlers.") for t in listed)
    names = [t.rsplit(".", 1)[-1] for t in listed]
    assert names == ["AugmentPreview", "KnnMonitor", "MetricsWriter", "StatsLogger", "MlflowLogger", "CheckpointSaver"]


def test_mlflow_handler_disabled_logs_nothing_but_trains_and_checkpoints(pool: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    mlflow = _handler_index("MlflowLogger")
    run_bundle_config([TRAIN], overrides={"datalist": str(pool), "output_dir": str(out), "tracking_uri": uri,
                                          "experiment": "kept", f"handlers#{mlflow}#_disabled_": True, **TINY})
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)  # trained, finite
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 3 and last["mlflow_run_id"] is None and (out / "encoder.pt").exists()
    assert last["config"]["experiment"] == "kept"  # the config still names it: the list decides
    assert MlflowClient(uri).get_experiment_by_name("kept") is None  # no run, no experiment
    assert not (out / "mlflow_spool.jsonl").exists()


def test_user_handler_from_a_set_override_gets_every_iteration_with_its_losses(pool: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medssl.cli import app

    out, record = tmp_path / "run", tmp_path / "events.jsonl"
    slot = _handler_index("StatsLogger")  # replaced by the user's handler; the others stay
    args = ["bundle", "run", str(TRAIN), "--set", f"datalist={pool}", "--set", f"output_dir={out}",
            "--set", "experiment=None",
            "--set", f"handlers.{slot}={{_target_: {__name__}.LossRecorder, path: {record}}}", "--"]
    for k, v in TINY.items():
        args += [f"--{k}", json.dumps(v)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = _rows(record)
    assert [r["event"] for r in rows] == ["started", *["iteration_completed"] * 3, "completed"]
    steps = [r for r in rows if r["event"] == "iteration_completed"]
    written = _rows(out / "metrics.jsonl")
    assert [(r["step"], r["output"]["loss"]) for r in steps] == [(w["step"], w["loss"]) for w in written]
    assert all({"loss", "lr"} <= set(r["output"]) for r in steps)
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(("override", "words"), [
    ({"handlers#4#_target_": "medssl.engines.pretrain.handlers.MlflowLoger"},
     "unknown _target_ 'medssl.engines.pretrain.handlers.MlflowLoger' at key 'handlers#4'"),
    ({"handlers#2": {"_target_": "my_pkg.NoSuchHandler"}}, "unknown _target_ 'my_pkg.NoSuchHandler' at key 'handlers#2'"),
    ({"handlers#5#save_evry": 10}, "key 'handlers#5#save_evry' does not exist"),
])
def test_misspelled_handler_is_one_line_naming_file_and_key(override: dict, words: str, tmp_path: Path) -> None:
    with pytest.raises(MedsslError) as e:
        run_bundle_config([TRAIN], overrides={"output_dir": str(tmp_path / "never"), **override})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{TRAIN}: ") and words in msg
    assert not (tmp_path / "never").exists()


def test_misspelled_handler_in_a_variant_file_and_a_non_handler_target(pool: Path, tmp_path: Path) -> None:
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump({"handlers": [
        {"_target_": "medssl.engines.pretrain.handlers.MetricsWriter"},
        {"_target_": "medssl.engines.pretrain.handlers.ChekpointSaver"}]}))
    with pytest.raises(MedsslError) as e:
        run_bundle_config([TRAIN, variant], overrides={"output_dir": str(tmp_path / "never")})
    assert str(e.value) == (f"{variant}: unknown _target_ 'medssl.engines.pretrain.handlers.ChekpointSaver' at key "
                            "'handlers#1' (neither a MONAI component nor an importable name)")
    # an importable target that is no handler: refused when the run starts, naming the file, before any step
    with pytest.raises(MedsslError) as e:
        run_bundle_config([TRAIN], overrides={"datalist": str(pool), "output_dir": str(tmp_path / "x"),
                                              "experiment": None, "handlers#3": {"_target_": "torch.nn.Identity"},
                                              **TINY})
    msg = str(e.value)
    assert msg.startswith(f"{TRAIN}: handlers[3] (Identity()) is not a pretraining handler") and "\n" not in msg
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
