"""``medssl bundle run``: one MONAI bundle config run with checked overrides and one-line errors.

One override dialect (README, "MONAI bundles"): the CLI's dotted ``--set a.b=1`` is MONAI's id ``a#b`` with the
value ``1``; ``-- --a#b 1`` (MONAI's own spelling, after ``--``) means the same. Both values are parsed alike, as
YAML literals (plus ``1e-4`` → float and ``None`` → None, as ``medssl pretrain --set``), so both spellings give the
same resolved config (:func:`bundle_overrides`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["bundle_overrides", "resolve_bundle", "run_bundle_config"]

log = logging.getLogger(__name__)


def bundle_overrides(sets: Sequence[str] = (), args: Sequence[str] = ()) -> dict[str, Any]:
    """Overrides ``{"a#b": value}`` from ``--set a.b=VALUE`` strings and MONAI-style ``["--a#b", "VALUE"]`` tokens.

    Args:
        sets: ``"key.sub=value"`` strings (``.`` → ``#``).
        args: tokens ``--id value`` or ``--id=value`` (ids already in ``#`` form; ``.`` is accepted too).

    Raises:
        MedsslError: a ``--set`` without ``=``, a token that is not ``--id``, or an id without a value.
    """
    from medssl.config import _parse_value

    out: dict[str, Any] = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise MedsslError(f"--set {s!r} must look like key.sub=value (e.g. optimizer.lr=1e-4)")
        out[key.strip().replace(".", "#")] = _parse_value(value)
    tokens = list(args)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise MedsslError(f"bundle argument {tok!r}: expected --id value (e.g. --optimizer#lr 1e-4)")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise MedsslError(f"bundle argument {tok!r} has no value")
            value, i = tokens[i + 1], i + 1
        out[key.replace(".", "#")] = _parse_value(value)
        i += 1
    return out


def resolve_bundle(config_files: Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> Any:
    """The checked, merged ``ConfigParser`` of ``config_files`` with ``overrides`` applied (nothing built yet).

    Raises:
        MedsslError: a missing file, an override id that does not exist, an unknown ``_target_`` (one line
            naming the key and the config file).
    """
    from medssl.bundles.check import checked_parser

    files = [str(f) for f in config_files]
    for f in files:
        if not Path(f).is_file():
            raise MedsslError(f"bundle config {f} not found")
    return checked_parser(files, dict(overrides or {}))


def run_bundle_config(config_files: Sequence[str | Path], *, meta_file: str | Path | None = None,
                      overrides: Mapping[str, Any] | None = None, run_id: str | None = None) -> None:
    """Check and run a bundle workflow: ``initialize``, then ``run_id`` (default ``run``, else ``training``), then
    ``finalize`` (MONAI's ``ConfigWorkflow``).

    Args:
        config_files: the config and its variants, merged in order (e.g. ``train.yaml``, ``multi_gpu_train.yaml``).
        meta_file: the bundle's ``metadata.json`` (default: ``configs/metadata.json`` beside the config if present).
        overrides: ``{"a#b": value}`` (:func:`bundle_overrides`).
        run_id: the id to run.

    Raises:
        MedsslError: a bad override / ``_target_`` / run id before anything is built; a ``MedsslError`` raised
            while building or running (unwrapped from MONAI's ``RuntimeError``), prefixed with the config file.
    """
    from monai.bundle import ConfigWorkflow

    files = [str(f) for f in config_files]
    parser = resolve_bundle(files, overrides)
    if run_id is None:
        run_id = "run" if "run" in parser else "training" if "training" in parser else "run"
    if run_id not in parser:
        raise MedsslError(f"{files[0]}: no id {run_id!r} to run (the workflow ids are 'run' or 'training')")
    if meta_file is None and (Path(files[0]).parent / "metadata.json").is_file():
        meta_file = Path(files[0]).parent / "metadata.json"
    kw: dict[str, Any] = {"meta_file": str(meta_file)} if meta_file else {}
    workflow = ConfigWorkflow(config_file=files, workflow_type=None, run_id=run_id, **kw, **dict(overrides or {}))
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except RuntimeError as e:
        cause = _medssl_cause(e)
        if cause is None:
            raise
        if type(cause) is not MedsslError:  # e.g. Preempted keeps its type and exit code
            raise cause from e
        raise MedsslError(f"{files[0]}: {cause}") from e


def _medssl_cause(e: BaseException) -> MedsslError | None:
    """The first ``MedsslError`` in an exception's cause chain (MONAI wraps errors of built components)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MedsslError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
