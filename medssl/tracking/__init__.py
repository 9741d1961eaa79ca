"""medssl.tracking."""

from __future__ import annotations
