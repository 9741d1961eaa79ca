"""The engine packages' layout: lazy package exports that resolve to their defining module, cheap package
imports, and every bundle ``_target_`` naming an importable object."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "pretrain", "finetune", "studies")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_exports_resolve_to_their_module(name: str) -> None:
    pkg = importlib.import_module(f"medssl.engines.{name}")
    listed = [n for names in pkg._MODULES.values() for n in names]
    assert sorted(pkg.__all__) == sorted(listed) and len(set(listed)) == len(listed)
    files = {p.stem for p in (REPO / "medssl" / "engines" / name).glob("*.py")} - {"__init__"}
    assert set(pkg._MODULES) == files  # every module of the package is described, none invented
    for module, names in pkg._MODULES.items():
        mod = importlib.import_module(f"medssl.engines.{name}.{module}")
        for n in names:
            assert n in mod.__all__ and getattr(pkg, n) is getattr(mod, n), (module, n)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_package_import_is_lazy() -> None:
    code = (
        "import sys; from medssl.engines.finetune import FinetuneConfig; import medssl.engines.studies;"
        "print(sorted(m for m in sys.modules if m.startswith('medssl.engines')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert "medssl.engines.finetune.config" in loaded
    assert not {"medssl.engines.finetune.engine", "medssl.engines.pretrain.engine",
                "medssl.engines.studies.sweep"} & set(loaded)


def _targets(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_bundle_targets_import() -> None:
    targets = {t for f in sorted(REPO.glob("bundles/*/configs/*.yaml")) for t in _targets(yaml.safe_load(f.read_text()))}
    medssl_targets = sorted(t for t in targets if t.startswith("medssl."))
    assert any(t.startswith("medssl.engines.") for t in medssl_targets)
    for t in medssl_targets:
        module, _, attr = t.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), t
