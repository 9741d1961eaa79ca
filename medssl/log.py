"""Logging set-up for the CLI (library modules only call ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

__all__ = ["setup_logging"]


def setup_logging(verbose: bool = False, console: Console | None = None) -> None:
    """Route the ``medssl`` logger through rich; INFO by default, DEBUG with ``verbose``."""
    logger = logging.getLogger("medssl")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(logger.handlers):
        if isinstance(h, RichHandler):
            logger.removeHandler(h)
    handler = RichHandler(console=console or Console(stderr=True), show_path=verbose, rich_tracebacks=verbose)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
