"""What every `medssl` command shares: consoles, the ``--verbose`` option, logging set-up, the one-red-line
error and the exit codes (see :mod:`medssl.cli`).

A module of its own so that the command modules (:mod:`medssl.cli_train`, :mod:`medssl.cli_studies`,
:mod:`medssl.cli_deploy`) and :mod:`medssl.cli`, which registers them all on one ``app``, import it and not
each other: ``python -m medssl.cli`` runs ``medssl.cli`` as ``__main__``, and a command module importing
``medssl.cli`` would build a second app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = [
    "EXIT_CHILDREN_FAILED",
    "EXIT_ERROR",
    "EXIT_QUARANTINED",
    "Verbose",
    "console",
    "csv_list",
    "err_console",
    "fail",
    "setup",
    "write_estimate",
]

console = Console()
err_console = Console(stderr=True)

#: 1: a ``MedsslError``; 3: ``ingest`` quarantined some inputs; 4: ``sweep`` had FAILED children
#: (2 is Click's bad usage; 75, ``Preempted.exit_code``, a run stopped by a preemption signal)
EXIT_ERROR, EXIT_QUARANTINED, EXIT_CHILDREN_FAILED = 1, 3, 4

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")]


def setup(verbose: bool) -> None:
    """Rich logging on stderr, DEBUG with ``--verbose``."""
    from medssl.log import setup_logging

    setup_logging(verbose, err_console)


def fail(e: Exception, verbose: bool) -> typer.Exit:
    """One red line for ``e`` (the traceback too with ``--verbose``); returns the ``typer.Exit`` to raise, with
    ``e.exit_code`` when it has one (``Preempted``: 75), else :data:`EXIT_ERROR`."""
    if verbose:
        err_console.print_exception()
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    return typer.Exit(getattr(e, "exit_code", EXIT_ERROR))  # medssl.engines.runtime.preemption.Preempted: 75


def csv_list(value: str, cast: type) -> list:
    """``"1,5, 10"`` → ``[1, 5, 10]`` with ``cast`` applied; a bad item is a usage error (exit code 2).

    Raises:
        typer.BadParameter: an item ``cast`` rejects, naming the whole value.
    """
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: expected a comma-separated list of {cast.__name__}") from e


def write_estimate(est: Any, json_out: Path | None) -> None:
    """The notes under a ``--dry-run`` table, and the estimate (``est.to_dict()``) as JSON when asked."""
    import json

    for note in est.notes:
        console.print(f"note: {note}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(est.to_dict(), indent=1, default=str))
        console.print(f"estimate written to {json_out}")
