from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from medssl.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri, flush_spool, standard_tags


class FakeClient:
    """MlflowClient stand-in that can be switched down (every call raises ConnectionError)."""

    def __init__(self) -> None:
        self.down = False
        self.metrics: list[tuple[str, float, int]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.status: str | None = None
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("tracking server unreachable")

    def get_experiment_by_name(self, name: str):
        self._check()
        return SimpleNamespace(experiment_id="1")

    def create_run(self, experiment_id: str, tags=None, run_name=None):
        self._check()
        self.tags.update(tags or {})
        return SimpleNamespace(info=SimpleNamespace(run_id="run0"))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._check()
        self.metrics += [(m.key, m.value, m.step) for m in metrics]
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id: str, path: str, artifact_path=None) -> None:
        self._check()
        self.artifacts.append(Path(path).name)

    def set_terminated(self, run_id: str, status: str = "FINISHED", end_time=None) -> None:
        self._check()
        self.status = status


def _tracker(client: FakeClient, tmp_path: Path, **kw) -> MlflowTracker:
    return MlflowTracker(
        "exp",
        client=client,
        spool_path=tmp_path / "spool.jsonl",
        flush_every_s=0.0,
        backoff_s=0.01,
        max_backoff_s=0.02,
        **kw,
    )


def test_outage_is_spooled_and_replayed_without_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeClient()
    tr = _tracker(client, tmp_path)
    tr.log_params({"lr": 0.1})
    for step in range(3):
        tr.log_metrics({"loss": 1.0 / (step + 1)}, step)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="medssl"):
        for step in range(3, 8):
            tr.log_metrics({"loss": 1.0 / (step + 1), "bad": "text"}, step)  # never raises
    assert "unreachable" in caplog.text
    spooled = [json.loads(x) for x in (tmp_path / "spool.jsonl").read_text().splitlines()]
    assert {r["step"] for r in spooled} <= set(range(3, 8)) and all(r["run_id"] == "run0" for r in spooled)
    client.down = False
    tr.log_metrics({"loss": 0.01}, 8)
    tr.flush()
    assert [s for k, _, s in client.metrics if k == "loss"] == list(
        range(9)
    )  # in order, none lost, no duplicate
    assert not (tmp_path / "spool.jsonl").exists() and client.params == {"lr": "0.1"}
    assert tr.close() and client.status == "FINISHED"


def test_close_during_outage_leaves_spool_for_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient()
    tr = _tracker(client, tmp_path, close_timeout_s=0.1)
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    client.down = True
    tr.log_metrics({"loss": 2.0}, 0)
    tr.log_artifact(artifact)
    with caplog.at_level(logging.WARNING, logger="medssl"):
        assert tr.close() is False
    assert "kept in" in caplog.text and client.status is None
    kinds = [json.loads(x)["type"] for x in (tmp_path / "spool.jsonl").read_text().splitlines()]
    assert kinds == ["metric", "artifact", "status"]
    with pytest.raises(ConnectionError):
        flush_spool(tmp_path / "spool.jsonl", client=client)
    assert (tmp_path / "spool.jsonl").exists()
    client.down = False
    assert flush_spool(tmp_path / "spool.jsonl", client=client) == 3
    assert (
        client.metrics == [("loss", 2.0, 0)] and client.artifacts == ["a.txt"] and client.status == "FINISHED"
    )
    assert (
        not (tmp_path / "spool.jsonl").exists() and flush_spool(tmp_path / "spool.jsonl", client=client) == 0
    )


def test_backoff_does_not_retry_on_every_call(tmp_path: Path) -> None:
    client = FakeClient()
    tr = MlflowTracker("exp", client=client, spool_path=tmp_path / "s.jsonl", flush_every_s=0.0, backoff_s=60)
    client.down, calls = True, client.calls
    for step in range(20):
        tr.log_metrics({"loss": 1.0}, step)
    assert client.calls - calls == 1  # one failed attempt, then waiting for the backoff
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 20  # everything safely on disk


def test_default_uri_and_standard_tags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    tags = standard_tags(
        "finetune", study="hippo", fraction=10, init="ssl", seed=0, data_hash="abc", sha="deadbeef"
    )
    assert tags == {
        "medssl.kind": "finetune",
        "medssl.study": "hippo",
        "medssl.fraction": "10",
        "medssl.init": "ssl",
        "medssl.seed": "0",
        "medssl.data_hash": "abc",
        "medssl.git_sha": "deadbeef",
    }
    assert "medssl.study" not in standard_tags("pretrain", sha="x")


def test_parent_child_runs_in_sqlite_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = MlflowTracker(
        "study",
        tracking_uri=uri,
        run_name="study-hippo",
        tags=standard_tags("sweep", sha="x"),
        spool_path=tmp_path / "p.jsonl",
    )
    child = MlflowTracker(
        "study",
        tracking_uri=uri,
        run_name="f10-ssl-s0",
        parent_run_id=parent.run_id,
        tags=standard_tags("finetune", study="hippo", fraction=10, init="ssl", seed=0, sha="x"),
        spool_path=tmp_path / "c.jsonl",
    )
    child.log_params({"lr": 1e-3, "roi": [32, 32, 32]})
    for step in range(3):
        child.log_metrics({"dice": 0.5 + 0.1 * step}, step)
    (tmp_path / "table.csv").write_text("a,b\n")
    child.log_artifact(tmp_path / "table.csv", "compare")
    assert child.close() and parent.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["medssl.fraction"] == "10"
    assert run.data.params == {"lr": "0.001", "roi": "[32, 32, 32]"} and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(child.run_id, "dice")] == pytest.approx(
        [0.5, 0.6, 0.7]
    )
    assert [f.path for f in client.list_artifacts(child.run_id, "compare")] == ["compare/table.csv"]
    assert (tmp_path / "mlartifacts" / "study").is_dir()  # artifacts beside the sqlite file
    again = MlflowTracker(
        "study", tracking_uri=uri, run_id=child.run_id, spool_path=tmp_path / "c.jsonl", tags={"resumed": 1}
    )
    assert again.run_id == child.run_id and client.get_run(child.run_id).info.status == "RUNNING"
    assert again.close() and client.get_run(child.run_id).data.tags["resumed"] == "1"
