"""``torch.distributed`` glue for running the same engine on 1 CPU process or N GPUs under ``torchrun``.

No cluster code of our own: ``torchrun`` (or SLURM's ``srun torchrun``) starts the processes and sets
``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``; this module only reads
them, initialises the process group (NCCL on CUDA, Gloo on CPU) and offers the few collectives the
engine needs. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op on one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "env_world_size",
    "init_distributed",
    "dist_info",
    "cleanup_distributed",
    "barrier",
    "all_gather_objects",
    "mean_across_ranks",
    "any_across_ranks",
    "wrap_ddp",
    "select_rank_state",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Position of this process: global ``rank``, ``local_rank`` (GPU index on its node), ``world_size``."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process writing checkpoints, metrics and MLflow."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def dist_info() -> DistInfo:
    """The current process group's position, or the single-process default."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())
    return DistInfo()


def init_distributed(device: str = "auto") -> tuple[DistInfo, bool]:
    """Initialise the default process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    Backend: NCCL when the run uses CUDA (``device`` ``"auto"`` with a GPU, or ``"cuda…"``), the process
    then bound to ``cuda:LOCAL_RANK``; Gloo otherwise (CPU). An already initialised group is reused.

    Args:
        device: the config's device string (``"cpu"``, ``"cuda"``, ``"auto"`` …).

    Returns:
        ``(info, created)``: ``created`` is True when this call made the group (the caller destroys it
        with :func:`cleanup_distributed`).
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info(), False
    if env_world_size() <= 1:
        return DistInfo(), False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)
    info = dist_info()
    log.info(
        "distributed: rank %d/%d (local %d), backend %s", info.rank, info.world_size, local_rank, backend
    )
    return info, True


def cleanup_distributed() -> None:
    """``destroy_process_group`` if a group exists (safe to call twice, or on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Picklable ``obj`` of every rank, indexed by rank (``[obj]`` on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a float tensor over ranks (one all-reduce; identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank, so that all ranks take the same branch (e.g. skip a step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap_ddp(
    module: torch.nn.Module,
    device: torch.device,
    sync_batchnorm: bool = False,
    find_unused_parameters: bool = True,
) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` (already on ``device``); identity on one process.

    Only parameters with ``requires_grad`` are all-reduced, so frozen parts (BYOL's EMA target, a frozen
    stem) stay out of the reducer; rank 0's parameters and buffers are broadcast at construction and
    buffers (BatchNorm statistics) before each forward. The caller keeps the unwrapped module for
    ``state_dict``, ``on_step_end`` hooks and the encoder.

    Args:
        module: the SSL method (``forward(batch dict) -> dict``).
        device: its device; CUDA modules are bound to that device id.
        sync_batchnorm: convert BatchNorm to ``SyncBatchNorm`` first (CUDA only; warns on CPU).
        find_unused_parameters: DDP flag for forwards that leave trainable parameters unused.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    if sync_batchnorm:
        if device.type == "cuda":
            # converts in place below the top level; the top-level module is never a BatchNorm here
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        else:
            log.warning("sync_batchnorm ignored on %s (SyncBatchNorm needs CUDA)", device)
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def select_rank_state(state: dict[str, Any], info: DistInfo) -> dict[str, Any] | None:
    """This rank's ``{"rng", "augment", "data"}`` from a pretraining checkpoint.

    A checkpoint written by N ranks holds them under ``"ranks"`` (single-process ones at the top level).
    Resumed on the same N, each rank gets its own: exact. On another N, rank 0 takes the saved rank 0's
    state (its data position without the old shard) and the other ranks keep their fresh ``seed + rank``
    streams, with a warning: training continues, but not exactly as an uninterrupted run.

    Returns:
        The state to restore, or ``None`` (keep the current one).
    """
    ranks = state.get("ranks") or [{k: state.get(k) for k in ("rng", "augment", "data")}]
    if len(ranks) == info.world_size:
        return ranks[info.rank]
    log.warning(
        "checkpoint written by %d rank(s), resumed on %d: data order and augmentation continue, but "
        "not exactly as an uninterrupted run",
        len(ranks),
        info.world_size,
    )
    if info.rank != 0:
        return None
    own = dict(ranks[0])
    own["data"] = {k: v for k, v in own["data"].items() if k not in ("rank", "world_size")}
    return own
