"""Lazy package exports (PEP 562 ``__getattr__``) for the engine packages: ``from medssl.engines.finetune import
FinetuneConfig`` loads only ``finetune/config.py``, not the whole engine with torch and MONAI, and no package
``__init__`` imports a sibling package (no import cycles).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["load_attribute"]


def load_attribute(package: str, modules: Mapping[str, Sequence[str]], name: str) -> Any:
    """The public ``name`` of ``package``, imported from the module of ``modules`` (module → names) defining it.

    Raises:
        AttributeError: ``name`` is not a public name of ``package`` (what ``getattr`` expects).
    """
    for module, names in modules.items():
        if name in names:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
