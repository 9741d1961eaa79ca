"""Parts of the finetuning bundles' ``multi_gpu_train.yaml`` (MONAI model-zoo pattern, under ``torchrun``).

``multi_gpu_train.yaml`` is merged over ``train.yaml``: the device from ``LOCAL_RANK``, the network wrapped in
``DistributedDataParallel``, MONAI's ``DistributedSampler`` for the training data, and only rank 0 attaching the
handlers that write (checkpoints, MLflow, log lines). These helpers keep the logic out of ``$`` expressions:

- :func:`local_device`: ``cuda:LOCAL_RANK`` on a GPU node, else the CPU.
- :func:`ddp_device_ids`: ``DistributedDataParallel``'s ``device_ids`` for that device (``None`` on the CPU).
- :func:`is_main_process`: whether this process is global rank 0 (from ``RANK``, valid before the group exists).
- :func:`init_process_group`: the process group (NCCL on a GPU, Gloo on the CPU, chosen from
  ``torch.cuda.is_available()``), through :func:`medssl.engines.runtime.distributed.init_distributed`.
- :func:`attach_handlers`: attach handlers to an engine, skipping those disabled on this rank (``None``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from medssl.engines.runtime.distributed import DistInfo, init_distributed

__all__ = ["local_device", "ddp_device_ids", "is_main_process", "init_process_group", "attach_handlers"]

log = logging.getLogger(__name__)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA is available (one GPU per ``torchrun`` process), else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def ddp_device_ids(device: torch.device | str) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` for a CUDA device, ``None`` for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


def is_main_process() -> bool:
    """True on global rank 0 (``RANK`` set by ``torchrun``; True on one process without it)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def init_process_group() -> DistInfo:
    """The default process group for this ``torchrun`` process (reused if one exists).

    Backend NCCL (process bound to ``cuda:LOCAL_RANK``) when ``torch.cuda.is_available()``, Gloo otherwise. On one
    process (``WORLD_SIZE`` unset or 1) nothing is created and the single-process position is returned.

    Returns:
        This process's rank, local rank and world size.
    """
    info, _ = init_distributed("auto")
    log.info("bundle process group: rank %d of %d", info.rank, info.world_size)
    return info


def attach_handlers(engine: Any, handlers: Sequence[Any | None]) -> None:
    """``handler.attach(engine)`` for each handler that is not ``None``.

    A handler whose ``_disabled_`` evaluates true on this rank (e.g. ``"$not @is_main"`` for MLflow) is ``None`` in
    the resolved config; it is skipped, so the same ``run`` list serves every rank.

    Args:
        engine: an ignite engine (MONAI trainer / evaluator).
        handlers: handler objects with ``attach(engine)``, or ``None``.
    """
    for h in handlers:
        if h is not None:
            h.attach(engine)
