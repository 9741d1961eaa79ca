"""medssl.methods."""

from __future__ import annotations
