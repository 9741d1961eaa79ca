"""medssl.networks: MONAI encoders with transferable weights, SSL heads, downstream nets and weight transfer."""

from __future__ import annotations

from medssl.networks.downstream import DOWNSTREAM_KINDS, build_downstream
from medssl.networks.encoders import ENCODERS, Encoder, build_encoder, rebuild_encoder
from medssl.networks.heads import ProjectionHead, ReconstructionHead
from medssl.networks.transfer import TransferReport, load_ssl_checkpoint, transfer_weights

__all__ = ["DOWNSTREAM_KINDS", "ENCODERS", "Encoder", "ProjectionHead", "ReconstructionHead", "TransferReport",
           "build_downstream", "build_encoder", "load_ssl_checkpoint", "rebuild_encoder", "transfer_weights"]
