"""Bundle config checks with one-line errors naming the key and the config file.

MONAI silently adds an override id that does not exist (``--optimizer#lrr 1e-4`` trains with the default lr)
and reports an unknown ``_target_`` deep inside instantiation with a long trace. These checks run before anything
is built:

- :func:`check_overrides`: every override id exists in the merged configs (a new key is accepted only as an
  argument the component's ``_target_`` takes), every ``_target_`` given resolves.
- :func:`check_targets`: every ``_target_`` of the merged configs resolves (a MONAI component name or an
  importable dotted path).
- :func:`checked_parser`: both checks, returning the merged parser with the overrides applied;
  :func:`run_bundle`: the same, then ``monai.bundle.run``.

Errors read ``"<file>: key 'optimizer#lrr' does not exist (did you mean 'optimizer#lr'?)"`` or
``"<file>: unknown _target_ 'Foo' at key 'network_def'"``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["check_overrides", "check_targets", "checked_parser", "config_ids", "run_bundle"]


def config_ids(files: Sequence[str | Path]) -> tuple[Any, dict[str, str]]:
    """The merged ``ConfigParser`` of ``files`` and, per top-level id, the file that defines it last.

    Raises:
        MedsslError: an unreadable config file.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    owner: dict[str, str] = {}
    for f in files:
        try:
            content = ConfigParser.load_config_file(f)
        except (OSError, ValueError) as e:
            raise MedsslError(f"cannot read bundle config {f}: {e}") from e
        parser.update(content)
        owner |= {str(k): str(f) for k in content}
    return parser, owner


def _files(config_file: str | Path | Sequence[str | Path]) -> list[str]:
    return [str(config_file)] if isinstance(config_file, (str, Path)) else [str(f) for f in config_file]


def _locate(name: str) -> Any:
    from pydoc import locate

    return locate(name) if "." in name else None


def _resolve(target: str, locator: Any) -> Any:
    """The object a ``_target_`` names (MONAI component name or dotted path), or ``None``."""
    modules = locator.get_component_module_name(target)
    module = modules[0] if isinstance(modules, list) else modules
    return _locate(f"{module}.{target}") if module else _locate(target)


def _is_ref(value: Any) -> bool:
    return not isinstance(value, str) or value.startswith(("$", "@", "%"))


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(id, _target_)`` of every component in a config tree (ids joined with ``#``)."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node["_target_"]
        for k, v in node.items():
            yield from _walk(v, f"{key}#{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{key}#{i}" if key else str(i))


def _ids(node: Any, key: str = "") -> Iterator[str]:
    """Every id of a config tree (``a``, ``a#b``, ``a#0`` …)."""
    if key:
        yield key
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _ids(v, f"{key}#{k}" if key else str(k))


def _hint(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_targets(config_file: str | Path | Sequence[str | Path], parser: Any = None,
                  owner: Mapping[str, str] | None = None) -> None:
    """Every ``_target_`` of the merged configs names a MONAI component or an importable object.

    Raises:
        MedsslError: ``"<file>: unknown _target_ 'Foo' at key 'network_def'"``.
    """
    from monai.bundle.config_item import ComponentLocator

    files = _files(config_file)
    if parser is None:
        parser, owner = config_ids(files)
    locator = ComponentLocator()
    for key, target in _walk(parser.get()):
        if not _is_ref(target) and _resolve(target, locator) is None:
            where = (owner or {}).get(key.split("#")[0], ", ".join(files))
            raise MedsslError(f"{where}: unknown _target_ {target!r} at key {key!r} (neither a MONAI component "
                              "nor an importable name)")


def check_overrides(config_file: str | Path | Sequence[str | Path], overrides: Mapping[str, Any]) -> None:
    """Refuse overrides MONAI would accept silently or reject deep inside instantiation.

    Every override id (``a#b#c``, the bundle spelling of the CLI's ``--set a.b.c=…``) must exist in the merged
    configs, except a new key inside a ``_target_`` component that its callable takes as an argument or that is
    one of MONAI's component keys (``_disabled_``, ``_requires_``, ``_desc_``, ``_mode_``); every ``_target_``
    given must resolve.

    Raises:
        MedsslError: one line naming the override id and the config file, with the closest existing id.
    """
    from monai.bundle.config_item import ComponentLocator, ConfigComponent

    files = _files(config_file)
    parser, owner = config_ids(files)
    where = ", ".join(files)
    locator = ComponentLocator()
    for key, value in overrides.items():  # targets first: a swapped component takes the new one's arguments
        parts = str(key).split("#")
        target = value if parts[-1] == "_target_" else (value.get("_target_") if isinstance(value, dict) else None)
        if isinstance(target, str) and not _is_ref(target):
            if _resolve(target, locator) is None:
                at = "#".join(parts[:-1]) if parts[-1] == "_target_" else str(key)
                raise MedsslError(f"{owner.get(parts[0], where)}: unknown _target_ {target!r} at key {at!r} "
                                  "(neither a MONAI component nor an importable name)")
            if parts[-1] == "_target_" and str(key) in parser:
                parser[str(key)] = target
    known = list(_ids(parser.get()))
    for key in overrides:
        parts = str(key).split("#")
        top, parent = owner.get(parts[0], where), "#".join(parts[:-1])
        if str(key) in parser:
            continue
        node = parser.get(parent) if parent and parent in parser else None
        if not (isinstance(node, dict) and "_target_" in node):
            raise MedsslError(f"{top}: key {key!r} does not exist{_hint(str(key), known)}")
        if parts[-1] in ConfigComponent.non_arg_keys:  # MONAI's own keys, e.g. `handlers#4#_disabled_ true`
            continue
        params = _params(node["_target_"], locator)
        if params is not None and parts[-1] not in params:
            names = [f"{parent}#{p}" for p in params] + [k for k in known if k.startswith(parent + "#")]
            raise MedsslError(f"{top}: key {key!r} does not exist: {node['_target_']} has no argument "
                              f"{parts[-1]!r}{_hint(str(key), names)}")


def _params(target: Any, locator: Any) -> list[str] | None:
    """Keyword arguments the component ``target`` takes; ``None`` when any is accepted (``**kwargs``, a ``$``
    target, an unknown signature)."""
    if _is_ref(target):
        return None
    obj = _resolve(target, locator)
    if obj is None:
        return None
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def checked_parser(config_file: str | Path | Sequence[str | Path], overrides: Mapping[str, Any]) -> Any:
    """The merged ``ConfigParser`` of the configs with ``overrides`` applied, after :func:`check_overrides` and
    :func:`check_targets` (nothing built yet).

    Raises:
        MedsslError: a bad override or ``_target_`` (one line naming the key and the config file).
    """
    files = _files(config_file)
    check_overrides(files, overrides)
    parser, owner = config_ids(files)
    parser.update(dict(overrides))
    check_targets(files, parser, owner)
    return parser


def run_bundle(config_file: str | Path | Sequence[str | Path], *, meta_file: str | Path | None = None,
               logging_file: str | Path | None = None, **overrides: Any) -> None:
    """``monai.bundle.run`` after :func:`checked_parser`'s checks (the Python form of ``python -m monai.bundle
    run``).

    Raises:
        MedsslError: a bad override or ``_target_``.
    """
    from monai.bundle import run

    files = _files(config_file)
    checked_parser(files, overrides)
    kw: dict[str, Any] = {"meta_file": str(meta_file)} if meta_file else {}
    if logging_file:
        kw["logging_file"] = str(logging_file)
    run(config_file=files, **kw, **overrides)
