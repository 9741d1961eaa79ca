"""Gathering embeddings across ranks with gradient, for losses that use the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["dist_ready", "world_size", "rank", "gather_with_grad"]


def dist_ready() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if dist_ready() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist_ready() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the gradient path to every rank's input.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the incoming gradients of
    every rank (reduce-scatter), so each rank's ``x`` receives the gradient of the sum of all ranks'
    losses. Under DDP (gradients averaged over ranks) this equals the single-process gradient of the
    mean loss over the global batch. All ranks must pass the same shape.

    Args:
        x: ``(B, E)`` local embeddings.

    Returns:
        ``(world_size * B, E)``, rank 0's rows first; ``x`` itself when not distributed.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
