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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medssl.config import PretrainConfig
from medssl.engines.runtime import checkpoint as ck
from medssl.errors import MedsslError

__all__ = [
    "resolve_device",
    "build_components",
    "build_augment",
    "make_recipe",
    "method_kwargs_for",
    "GATHERING_METHODS",
    "cpu_has_native_bf16",
    "autocast_for",
    "to_memory_format",
    "place_model",
    "make_tracker",
    "PretrainParts",
    "method_name",
    "config_for_parts",
    "as_schedule",
    "param_groups",
    "check_optimizer",
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
        from medssl.engines.pretrain.pool import load_pool, resolve_in_channels

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
    return encoder, method, build_augment(config, rank)


def build_augment(config: PretrainConfig, rank: int = 0) -> Callable:
    """The method's batched augmentation (``config.augment`` target or the method's preset), seeded
    ``config.seed + rank``."""
    roi = tuple(config.roi_size)
    if config.augment:
        return _import(config.augment)(config.method, roi, seed=config.seed + rank, **config.augment_kwargs)
    from medssl.transforms.batched import BatchedSSLAugment

    return BatchedSSLAugment.for_method(config.method, roi, seed=config.seed + rank, **config.augment_kwargs)


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
        "machine": ck.machine_info(),  # runs repeat bit for bit only on the same kind (runtime.checkpoint)
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


@dataclass
class PretrainParts:
    """Parts of a pretraining run built elsewhere (e.g. by a MONAI bundle config) and injected into
    :func:`medssl.engines.pretrain.engine.run_pretraining`; ``None`` parts are built from the config as the CLI does.

    Args:
        method: the SSL method (``method(batch) -> {"loss", …}``); its ``encoder`` attribute is the encoder whose
            weights and recipe are saved.
        augment: ``augment(volumes) -> batch dict`` (as :class:`~medssl.transforms.batched.BatchedSSLAugment`).
        optimizer: an optimizer over the method's parameters (built before the method is moved to its device:
            ``Module.to`` keeps the parameter objects).
        scheduler: an object with ``apply() -> lr`` (before each step), ``step()``, ``state_dict()`` /
            ``load_state_dict()`` (:class:`~medssl.engines.runtime.schedules.WarmupCosineSchedule`), or a torch
            ``LRScheduler`` stepped once per optimizer step.
    """

    method: torch.nn.Module
    augment: Callable | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any | None = None


def method_name(method: torch.nn.Module) -> str:
    """The registry name of a built method (``"simclr"``) when its class is the registered one, else its
    ``"module:Class"`` target (what ``PretrainConfig.method`` accepts)."""
    from medssl.methods.base import _REGISTRY

    target = f"{type(method).__module__}:{type(method).__qualname__}"
    name = getattr(method, "name", "")
    return name if _REGISTRY.get(name) == target else target


def config_for_parts(config: PretrainConfig, parts: PretrainParts) -> PretrainConfig:
    """``config`` with the fields the checkpoint recipe, ``config.yaml`` and MLflow record set from the built
    parts (``method``, ``method_kwargs`` when the method records them in ``build_kwargs``, ``encoder``,
    ``encoder_kwargs``, ``in_channels`` from the encoder's recipe), so a part swapped in a bundle is what the
    run reports.

    Raises:
        MedsslError: a method without ``encoder``, or an augmentation whose ``roi_size`` differs from the
            config's (the recipe would lie about the encoder's input size).
    """
    encoder = getattr(parts.method, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise MedsslError(f"injected method {type(parts.method).__name__} has no `encoder` module to save")
    changes: dict[str, Any] = {"method": method_name(parts.method)}
    if isinstance(getattr(parts.method, "build_kwargs", None), dict):
        changes["method_kwargs"] = dict(parts.method.build_kwargs)
    recipe = getattr(encoder, "recipe", None)
    if isinstance(recipe, dict) and recipe.get("name"):
        kwargs = dict(recipe.get("kwargs", {}))
        changes |= {"encoder": recipe["name"], "encoder_kwargs": {k: v for k, v in kwargs.items() if k != "in_channels"}}
        if kwargs.get("in_channels") is not None:
            changes["in_channels"] = int(kwargs["in_channels"])
    else:
        changes["encoder"] = f"{type(encoder).__module__}:{type(encoder).__qualname__}"
    roi = getattr(parts.augment, "roi_size", None)
    if roi is not None and [int(r) for r in roi] != list(config.roi_size):
        raise MedsslError(f"injected augmentation makes {list(roi)} views but the config's roi_size is "
                          f"{list(config.roi_size)}: set both to the same size")
    changed = {k: (getattr(config, k), v) for k, v in changes.items() if getattr(config, k) != v}
    if changed:
        log.info("config fields set from the injected parts (config, parts): %s", changed)
    return config.replace(**changes)


class _TorchSchedule:
    """A torch ``LRScheduler`` behind the engine's schedule interface (``apply`` / ``step`` / state)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self.total_steps = scheduler, None

    def apply(self) -> float:
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def as_schedule(scheduler: Any) -> Any:
    """``scheduler`` if it has the engine's ``apply()``; a torch ``LRScheduler`` wrapped; else ``MedsslError``."""
    if hasattr(scheduler, "apply") and hasattr(scheduler, "step"):
        return scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return _TorchSchedule(scheduler)
    raise MedsslError(f"injected scheduler {type(scheduler).__name__} has neither apply()/step() "
                      "(medssl's WarmupCosineSchedule) nor is a torch LRScheduler")


def param_groups(method: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The CLI's AdamW groups: weight decay on trainable ≥ 2-D parameters (weights), none on biases / norms."""
    params = [p for p in method.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": float(weight_decay)},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def check_optimizer(optimizer: torch.optim.Optimizer, method: torch.nn.Module) -> None:
    """An injected optimizer must update the method's own parameters (not a copy built from other ones)."""
    own = {id(p) for p in method.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if foreign or not any(g["params"] for g in optimizer.param_groups):
        raise MedsslError(f"the optimizer {type(optimizer).__name__} holds {foreign} parameter(s) that are not the "
                          "method's (or none at all): build it from the injected method's parameters")
