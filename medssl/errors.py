"""Domain exceptions.

`MedsslError` is the one exception the CLI turns into a red line and a documented exit code.
`QuarantineError` marks a single bad input (file or series): the caller records it in the
quarantine report with its reason and carries on with the rest of the batch.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MedsslError", "QuarantineError", "ConfigMismatchError"]


class MedsslError(Exception):
    """A user-facing error: bad arguments, unusable inputs, incompatible checkpoints."""


class QuarantineError(MedsslError):
    """One input cannot be used; it is quarantined with ``reason`` and the batch goes on.

    Args:
        reason: short machine-readable code, e.g. ``"gantry_tilt"``, ``"non_finite"``.
        detail: human-readable explanation naming the offending values.
        path: the offending file or folder, when known.
    """

    def __init__(self, reason: str, detail: str = "", path: str | Path | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.path = str(path) if path is not None else None
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))


class ConfigMismatchError(MedsslError):
    """Two configurations (e.g. a checkpoint recipe and a run config) disagree on named fields."""

    def __init__(self, fields: dict[str, tuple[object, object]], what: str = "configuration") -> None:
        self.fields = fields
        lines = ", ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in sorted(fields.items()))
        super().__init__(f"{what} mismatch on {len(fields)} field(s): {lines}")
