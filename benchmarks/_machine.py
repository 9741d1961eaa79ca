"""Machine facts printed beside every benchmark table (shared by the benchmark scripts): the library's
:func:`medssl.engines.runtime.checkpoint.cpu_model`, which runs also record."""

from __future__ import annotations

from medssl.engines.runtime.checkpoint import cpu_model

__all__ = ["cpu_model"]
