"""A rich progress bar (on stderr) for training loops; a no-op when disabled."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressBar"]


class ProgressBar:
    """Rich progress bar as a context manager yielding ``update(step, loss)`` (a no-op when disabled).

    Args:
        enabled: show it (else ``update`` does nothing).
        total: steps (or epochs) in all; ``start``: already done (resume).
        label: text in front of the bar (``"pretrain"``, ``"finetune"``).
    """

    def __init__(self, enabled: bool, total: int, start: int, label: str = "pretrain") -> None:
        self.enabled, self.total, self.start, self.label = enabled, total, start, label

    def __enter__(self) -> Callable[[int, float], None]:
        if not self.enabled:
            return lambda step, loss: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),  # stdout stays free for results
            transient=False,
        )
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total, completed=self.start, loss="")
        return lambda step, loss: self.bar.update(task, completed=step, loss=f"loss {loss:.4f}")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
