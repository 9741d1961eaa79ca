"""Build the pieces of a pretraining run from a config: device, encoder, method, augmentation, recipe.

Names resolve through medssl's registries (``medssl.networks.encoders.build_encoder``,
``medssl.methods.base.build_method``, ``medssl.transforms.batched.BatchedSSLAugment.for_method``),
imported lazily; a ``"package.module:callable"`` string is imported instead (bundle-style targets,
e.g. test doubles or a user's own method).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medssl.config import PretrainConfig
from medssl.engines import checkpoint as ck
from medssl.errors import MedsslError

__all__ = [
    "resolve_device",
    "build_components",
    "make_recipe",
    "method_kwargs_for",
    "GATHERING_METHODS",
    "cpu_has_native_bf16",
    "autocast_for",
    "to_memory_format",
    "place_model",
    "make_tracker",
]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _import(target: str) -> Callable:
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for a in attr.split("."):
            obj = getattr(obj, a)
    except (ImportError, AttributeError) as e:
        raise MedsslError(f"cannot import {target!r}: {e}") from e
    return obj


#: built-in methods whose loss takes ``gather_distributed`` (global-batch negatives / statistics)
GATHERING_METHODS = ("simclr", "vicreg", "swin")


def method_kwargs_for(config: PretrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The method's constructor kwargs; under DDP (``world_size > 1``) the built-in contrastive /
    variance methods (:data:`GATHERING_METHODS`) get ``gather_distributed=True`` unless the config sets it."""
    kwargs = dict(config.method_kwargs)
    if world_size > 1 and config.method in GATHERING_METHODS:
        kwargs.setdefault("gather_distributed", True)
    return kwargs


def build_components(
    config: PretrainConfig, *, rank: int = 0, world_size: int = 1
) -> tuple[torch.nn.Module, torch.nn.Module, Callable]:
    """Encoder, method and batched augmentation from the config (names, or ``"module:callable"`` targets).

    Args:
        config: the run config.
        rank, world_size: DDP position; the augmentation is seeded with ``config.seed + rank`` (ranks
            draw different views) and :func:`method_kwargs_for` turns on cross-rank gathering.

    Returns:
        ``(encoder, method, augment)`` where ``augment(images (B, C, D, H, W)) -> batch dict``.
    """
    try:
        return _build_components(config, rank, world_size)
    except (ValueError, KeyError, TypeError) as e:
        raise MedsslError(f"cannot build method {config.method!r} / encoder {config.encoder!r}: {e}") from e


def _build_components(
    config: PretrainConfig, rank: int = 0, world_size: int = 1
) -> tuple[torch.nn.Module, torch.nn.Module, Callable]:
    roi = tuple(config.roi_size)
    if config.in_channels is None:  # the pool's channel count (multi-channel datalists)
        from medssl.engines.data import load_pool, resolve_in_channels

        pool = load_pool(config.datalist, config.sections, config.splits, config.split_seed)
        config = resolve_in_channels(config, pool)
    if ":" in config.encoder:
        encoder = _import(config.encoder)(
            in_channels=config.in_channels, img_size=roi, **config.encoder_kwargs
        )
    else:
        from medssl.networks.encoders import build_encoder

        encoder = build_encoder(
            config.encoder, in_channels=config.in_channels, img_size=roi, **config.encoder_kwargs
        )
    if ":" in config.method:
        method = _import(config.method)(encoder, **method_kwargs_for(config, world_size))
    else:
        from medssl.methods.base import build_method

        method = build_method(config.method, encoder, **method_kwargs_for(config, world_size))
    if config.augment:
        augment = _import(config.augment)(
            config.method, roi, seed=config.seed + rank, **config.augment_kwargs
        )
    else:
        from medssl.transforms.batched import BatchedSSLAugment

        augment = BatchedSSLAugment.for_method(
            config.method, roi, seed=config.seed + rank, **config.augment_kwargs
        )
    return encoder, method, augment


def make_recipe(config: PretrainConfig, encoder: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint recipe: everything needed to rebuild and feed the encoder elsewhere."""
    enc = getattr(encoder, "recipe", None) or {"name": config.encoder, "kwargs": dict(config.encoder_kwargs)}
    return {
        "encoder": enc,
        "method": config.method,
        "method_kwargs": dict(config.method_kwargs),
        "in_channels": config.in_channels,
        "roi_size": list(config.roi_size),
        "source_size": config.source_size,
        "target_spacing": config.target_spacing,
        "normalisation": config.normalisation,
        "ct_window": list(config.ct_window),
        "versions": ck.library_versions(),
    }


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, x86; BF16/SVE-BF16, ARM)."""
    caps_fn = getattr(torch.cpu, "get_capabilities", None)
    if caps_fn is None:
        return False
    caps = caps_fn()
    return any(bool(caps.get(k)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def autocast_for(config: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass: ``config.amp`` on CUDA; bf16 on the CPU only with
    ``config.cpu_bf16`` and native hardware support (warns and returns ``None`` otherwise)."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp or "")
    if config.amp:
        log.warning("amp=%s ignored on %s (AMP runs on CUDA only; see cpu_bf16)", config.amp, device)
    if config.cpu_bf16 and device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16
        log.warning("cpu_bf16 ignored: this CPU has no native bf16 (AVX512-BF16/AMX)")
    return None


def to_memory_format(batch: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    """5-D tensors of a batch in ``channels_last_3d`` when asked (others untouched)."""
    if not channels_last:
        return batch
    return {
        k: v.contiguous(memory_format=torch.channels_last_3d) if torch.is_tensor(v) and v.ndim == 5 else v
        for k, v in batch.items()
    }


def place_model(
    config: PretrainConfig, method: torch.nn.Module, local_rank: int | None = None
) -> tuple[torch.nn.Module, torch.device, torch.dtype | None, bool]:
    """Move ``method`` to its device and memory format; apply ``num_threads``.

    Args:
        config: the run config (``device``, ``num_threads``, ``amp``, ``cpu_bf16``, ``channels_last``).
        method: the SSL method module.
        local_rank: under DDP, the process's GPU index (a CUDA device becomes ``cuda:local_rank``).

    Returns:
        ``(method, device, autocast dtype or None, channels_last)``. ``channels_last=None`` (auto) is on
        for fp32 CPU runs, where it was measured faster (``benchmarks/RESULTS.md``).
    """
    device = resolve_device(config.device)
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    method = method.to(device)
    amp_dtype = autocast_for(config, device)
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = device.type == "cpu" and amp_dtype is None
    if channels_last:
        method.to(memory_format=torch.channels_last_3d)
    return method, device, amp_dtype, bool(channels_last)


def make_tracker(config: PretrainConfig, data_hash: str, out_dir: Path, run_id: str | None = None) -> Any:
    """The run's ``MlflowTracker`` (standard tags + the config's, method/encoder tags; spool under
    ``out_dir``); ``run_id`` continues an existing run (resume)."""
    from medssl.tracking.mlflow_tracker import MlflowTracker, standard_tags

    tags = {
        **standard_tags("pretrain", seed=config.seed, data_hash=data_hash),
        **config.tags,
        "medssl.method": config.method,
        "medssl.encoder": config.encoder,
    }
    return MlflowTracker(
        config.experiment,
        run_name=config.run_name or Path(out_dir).name,
        tracking_uri=config.tracking_uri,
        tags=tags,
        run_id=run_id,
        parent_run_id=config.parent_run_id,
        spool_path=Path(out_dir) / "mlflow_spool.jsonl",
    )
