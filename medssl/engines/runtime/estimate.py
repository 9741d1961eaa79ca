"""What the dry runs (``medssl pretrain|finetune|sweep --dry-run``) share: the measured part of an estimate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TimedEstimate"]


@dataclass(kw_only=True)
class TimedEstimate:
    """The measured part of a run's estimate (keyword-only fields, after a subclass's own).

    Attributes:
        timing: seconds; ``timing["total"]`` is the whole run.
        device: where the timed steps ran (``"cpu"``, ``"cuda:0"``).
        machine: :func:`~medssl.engines.runtime.checkpoint.machine_info` of this machine.
        notes: what the estimate leaves out or bounds.
    """

    timing: dict[str, float]
    device: str
    machine: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def total_minutes(self) -> float:
        """The whole run, minutes."""
        return self.timing["total"] / 60.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return asdict(self)
