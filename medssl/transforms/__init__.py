"""medssl.transforms."""

from __future__ import annotations
