"""Loss precision: losses run in at least fp32, also under autocast (fp16/bf16 activations)."""

from __future__ import annotations

import torch

__all__ = ["at_least_fp32"]


def at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Promote fp16/bf16 tensors to fp32; fp32 and fp64 pass unchanged (so fp64 references stay exact)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)
