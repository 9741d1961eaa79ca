"""Import audit of the GPU suite's CPU dry run: ``benchmarks/gpu_suite.sh`` puts this folder first on
``PYTHONPATH``; then every Python process of the suite

- with ``GPU_SUITE_IMPORTS=<folder>``: writes, at exit, the top-level non-standard-library modules it
  imported to ``<folder>/<pid>.txt`` (one name a line; a refused import as ``!name``);
- with ``GPU_SUITE_ALLOWED=<file>`` (``benchmarks/gpu_image_packages.txt``): refuses, as
  ``ModuleNotFoundError``, the import of every installed distribution that is not in the file, as on the
  lent GPU machine where it is absent. Optional imports (``try: import gdcm``) then take their fallback,
  and an unguarded one fails the dry run in CI instead of the GPU run.

Nothing happens without the variables. Modules of no installed distribution (this repository, the
benchmark scripts) are never refused.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.metadata as md
import os
import re
import sys

__all__: list[str] = []

_REFUSED: set[str] = set()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed(path: str) -> set[str]:
    """Distribution names of the file, with the requirement closure of ``NAME +deps`` lines."""
    names, todo = set(), []
    for line in open(path).read().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *flags = line.split()
            names.add(_norm(name))
            if "+deps" in flags:
                todo.append(_norm(name))
    while todo:
        try:
            reqs = md.requires(todo.pop()) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            dep = _norm(re.split(r"[\s;<>=!~\[(]", r.strip(), maxsplit=1)[0])
            if dep and dep not in names:
                names.add(dep)
                todo.append(dep)
    return names


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses top-level imports of the given module names."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if path is None and name in self.names:
            _REFUSED.add(name)
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image: refused by the "
                                      "GPU suite's dry run, GPU_SUITE_ALLOWED)", name=name)
        return None


def _install(path: str) -> None:
    allowed = _allowed(path)
    refuse = {
        mod for mod, dists in md.packages_distributions().items()
        if not any(_norm(d) in allowed for d in dists) and mod not in sys.stdlib_module_names
    }
    sys.meta_path.insert(0, _Refuse(refuse))


def _dump() -> None:
    folder = os.environ.get("GPU_SUITE_IMPORTS")
    if not folder:
        return
    names = {m.split(".")[0] for m in list(sys.modules)}
    names = sorted(n for n in names - set(sys.stdlib_module_names) if not n.startswith("_"))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.getpid()}.txt"), "w") as f:
            f.write("\n".join(names + [f"!{n}" for n in sorted(_REFUSED)]) + "\n")
    except OSError:  # the audit must never break the process it watches
        pass


if os.environ.get("GPU_SUITE_ALLOWED"):
    _install(os.environ["GPU_SUITE_ALLOWED"])
if os.environ.get("GPU_SUITE_IMPORTS"):
    atexit.register(_dump)
