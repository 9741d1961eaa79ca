"""medssl.deploy."""

from __future__ import annotations
