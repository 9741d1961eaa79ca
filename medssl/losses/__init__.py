"""medssl.losses: SSL losses (one per file), leaves of the dependency graph (torch/MONAI only)."""

from __future__ import annotations

from medssl.losses.byol import BYOLLoss
from medssl.losses.ntxent import NTXentLoss
from medssl.losses.restoration import RestorationLoss
from medssl.losses.triplet import TripletViewLoss
from medssl.losses.vicreg import VICRegLoss

__all__ = ["BYOLLoss", "NTXentLoss", "RestorationLoss", "TripletViewLoss", "VICRegLoss"]
