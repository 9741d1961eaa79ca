"""medssl.methods: SSL methods, one file each; build one with :func:`build_method`."""

from __future__ import annotations

from medssl.methods.base import METHODS, SSLMethod, build_method

__all__ = ["METHODS", "SSLMethod", "build_method"]
