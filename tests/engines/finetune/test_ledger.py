"""``checkpoints/mlflow.json`` (:mod:`medssl.engines.runtime.ledger`, :mod:`medssl.engines.finetune.ledger`): what reached MLflow or its spool, per metric
key, fed by the tracker's ``on_durable`` hook; records only queued are not in it; an outage spools without waiting.
The real-run versions: ``test_crash_resume_logging.py`` (SIGKILL) and ``test_preempt_tracking.py`` (preemption)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.ledger import adopt_run
from medssl.engines.runtime.ledger import MetricLedger, config_key, recorded_run
from medssl.tracking.mlflow_tracker import MlflowTracker
from tests.tracking.test_mlflow_tracker import FakeClient


def test_ledger_records_steps_per_key_and_belongs_to_one_run(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "mlflow.json"
    ledger = MetricLedger(path, "run0", config_key="k1")
    assert json.loads(path.read_text()) == {"run_id": "run0", "config_key": "k1", "logged": {}}  # names its run
    ledger.mark([{"type": "metric", "key": "val_dice", "step": 4, "value": 0.5},
                 {"type": "metric", "key": "train_loss", "step": 2, "value": 1.0},
                 {"type": "param", "key": "lr", "value": "0.1"}, {"type": "status", "status": "KILLED"}])
    ledger.mark([{"type": "metric", "key": "val_dice", "step": 3, "value": 0.4}])  # never moves back
    assert json.loads(path.read_text())["logged"] == {"val_dice": 4, "train_loss": 2}
    resumed = MetricLedger(path, "run0", config_key="k1")
    # step 4 of train_loss is new, val_dice 4 is not (a key logged twice at one step in one call: per key)
    assert resumed.unlogged({"val_dice": 0.5, "train_loss": 0.9}, 4) == {"train_loss": 0.9}
    assert resumed.unlogged({"val_dice": 0.6, "test_dice": 0.7}, 5) == {"val_dice": 0.6, "test_dice": 0.7}
    assert recorded_run(path, "k1") == "run0" and recorded_run(path, "k2") is None and recorded_run(path) == "run0"
    other = MetricLedger(path, "run1")  # a fresh run in the same folder starts empty
    assert other.unlogged({"val_dice": 0.5}, 1) == {"val_dice": 0.5} and recorded_run(path) == "run1"
    assert not list(path.parent.glob(".*.tmp"))  # replaced atomically


def test_only_durable_records_are_marked_and_an_outage_spools_at_once(tmp_path: Path) -> None:
    client = FakeClient()
    ledger = MetricLedger(tmp_path / "mlflow.json", "run0")
    tr = MlflowTracker("exp", client=client, spool_path=tmp_path / "spool.jsonl", flush_every_s=3600.0,
                       backoff_s=60.0, on_durable=ledger.mark)  # fmt: skip
    tr.log_metrics({"val_dice": 0.1}, 1)
    assert ledger.logged == {}  # queued only: a kill now loses it, so the resume must send it
    tr.persist()
    assert ledger.logged == {"val_dice": 1} and client.metrics == [("val_dice", 0.1, 1)]
    client.down = True
    tr.log_metrics({"val_dice": 0.2}, 2)
    tr.persist()  # the server is down: spooled (fsynced) and marked
    assert ledger.logged == {"val_dice": 2} and "val_dice" in (tmp_path / "spool.jsonl").read_text()
    calls, start = client.calls, time.monotonic()
    tr.log_metrics({"val_dice": 0.3}, 3)
    tr.persist()  # within the backoff: to the spool without calling the server
    assert client.calls == calls and time.monotonic() - start < 5 and ledger.logged == {"val_dice": 3}
    assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 2
    client.down, tr._next_try = False, 0.0  # the server is back, the retry is due
    assert tr.close("FINISHED")
    assert [s for k, _, s in client.metrics if k == "val_dice"] == [1, 2, 3]


def test_adopt_run_only_names_a_run_for_a_folder_without_one(tmp_path: Path) -> None:
    cfg = FinetuneConfig(datalist="d.json", splits="s.json", out_dir=str(tmp_path / "a"), experiment="e")
    assert adopt_run(tmp_path / "a", "run0", cfg) and recorded_run(tmp_path / "a/checkpoints/mlflow.json",
                                                                  config_key(cfg)) == "run0"
    assert not adopt_run(tmp_path / "a", "run1", cfg)  # the folder already names its run
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"")
    assert not adopt_run(tmp_path / "b", "run0", cfg)  # a checkpoint names its run itself
    assert not adopt_run(tmp_path / "c", None, cfg)
    assert config_key(cfg) != config_key(cfg.replace(lr=cfg.lr * 2))
