"""medssl.networks: MONAI encoders with transferable weights, and SSL heads."""

from __future__ import annotations

from medssl.networks.encoders import ENCODERS, Encoder, build_encoder, rebuild_encoder
from medssl.networks.heads import ProjectionHead, ReconstructionHead

__all__ = ["ENCODERS", "Encoder", "ProjectionHead", "ReconstructionHead", "build_encoder", "rebuild_encoder"]
