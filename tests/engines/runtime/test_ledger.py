"""``medssl.engines.runtime.ledger.close_tracker``: the one rule for the status and tag an error leaves on a
training run's MLflow run (finetuning's ``close_run`` and pretraining's ``MlflowLogger`` both use it)."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from medssl.engines.runtime.ledger import close_tracker
from medssl.engines.runtime.preemption import Preempted
from medssl.errors import MedsslError


class _Tracker:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.status: str | None = None

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags |= tags

    def close(self, status: str) -> bool:
        self.status = status
        return True


@pytest.mark.parametrize(("error", "status", "tag", "words"), [
    (None, "FINISHED", None, ""),
    (Preempted(signal.SIGUSR1, 12, "out/checkpoints/last.pt"), "KILLED", "medssl.preempted", "SIGUSR1"),
    (KeyboardInterrupt(), "KILLED", "medssl.error", "KeyboardInterrupt"),
    (MedsslError("bad datalist d.json"), "FAILED", "medssl.error", "MedsslError: bad datalist d.json"),
])
def test_status_and_tag_per_error(error: BaseException | None, status: str, tag: str | None, words: str) -> None:
    tr = _Tracker()
    close_tracker(tr, error)
    assert tr.status == status
    assert list(tr.tags) == ([tag] if tag else []) and all(words in v for v in tr.tags.values())
    if isinstance(error, Preempted):
        assert "step 12" in tr.tags[tag]
    close_tracker(None, error)  # untracked: nothing to do


def test_tag_is_capped() -> None:
    tr = _Tracker()
    close_tracker(tr, RuntimeError("x" * 5000))
    assert tr.status == "FAILED" and len(tr.tags["medssl.error"]) == 1000
