"""Parts of ``bundles/ssl_pretrain/configs/train.yaml`` that wrap medssl's registries for a bundle.

The bundle builds every part of a pretraining run as a ``_target_`` (encoder, SSL method, view augmentation,
optimizer, LR schedule) and hands them to :func:`medssl.engines.pretrain.engine.run_pretraining` as a
:class:`~medssl.engines.pretrain.components.PretrainParts`, with its ``handlers:`` list (checkpoints, ``metrics.jsonl``,
MLflow, kNN monitor, preview: :mod:`medssl.engines.pretrain.handlers`, targeted directly). These helpers do what the CLI's
:func:`~medssl.engines.pretrain.components.build_components` does around the registries, so a bundle run with the default
parts equals ``medssl pretrain`` step for step:

- :func:`seed_all`: the CLI's seeding before the parts are built (same weights on every DDP rank).
- :func:`ssl_method`: a method by registry name (or ``"module:Class"``), cross-rank gathering under ``torchrun``
  for the contrastive / variance methods, its keyword arguments recorded for the checkpoint recipe.
- :func:`ssl_augment`: the method's batched view preset seeded ``seed + RANK``.
- :func:`run_tags`: the MLflow tags of a bundle run (``medssl.study``, ``medssl.source = bundle``).
- :func:`knn_probe`: ``evaluate.yaml``: the representation monitor's kNN probe of a written ``encoder.pt``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import MedsslError

__all__ = ["seed_all", "ssl_method", "ssl_augment", "run_tags", "knn_probe"]

log = logging.getLogger(__name__)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch as ``run_pretraining`` does before it builds its parts (bundle ``initialize``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ssl_method(name: str, encoder: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """The SSL method ``name`` around ``encoder``, as ``medssl pretrain --method NAME`` builds it.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the gathering methods (``simclr``, ``vicreg``, ``swin``) get
    ``gather_distributed=True`` unless given. ``kwargs`` are kept in ``method.build_kwargs`` (the checkpoint
    recipe's ``method_kwargs``).

    Args:
        name: a registry name (``simclr``, ``rotation``, ``mae`` … :data:`medssl.methods.base.METHODS`) or
            ``"package.module:Class"`` (called as ``Class(encoder, **kwargs)``).
        encoder: a :class:`medssl.networks.encoders.Encoder` (``medssl.networks.encoders.build_encoder``).
        **kwargs: the method's constructor arguments (e.g. ``temperature=0.2``).

    Raises:
        MedsslError: an unknown method, or an argument the method does not take (the valid ones named).
    """
    from medssl.engines.pretrain.components import GATHERING_METHODS, _import
    from medssl.methods.base import _REGISTRY, METHODS

    target = name if ":" in name else _REGISTRY.get(name)
    if target is None:
        raise MedsslError(f"unknown SSL method {name!r}; known: {', '.join(METHODS)} or 'package.module:Class'")
    cls = _import(target)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            valid = sorted(k for k in params if k != "encoder")
            raise MedsslError(f"SSL method {name!r} takes no argument(s) {bad}; valid: {valid}")
    build = dict(kwargs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name in GATHERING_METHODS:
        build.setdefault("gather_distributed", True)
    try:
        method = cls(encoder, **build)
    except (TypeError, ValueError) as e:
        raise MedsslError(f"cannot build SSL method {name!r}: {e}") from e
    method.build_kwargs = dict(kwargs)
    return method


def ssl_augment(method: str, roi_size: Sequence[int], seed: int = 0, **overrides: Any) -> Any:
    """The batched on-device view augmentation preset of ``method`` (``BatchedSSLAugment.for_method``),
    seeded ``seed + RANK`` like the CLI (DDP ranks draw different views).

    Args:
        method: a method name whose preset to use (``simclr``, ``rotation``, ``mae`` …).
        roi_size: view size ``(D, H, W)`` in voxels.
        seed: the run seed.
        **overrides: preset options (``flip_prob=0``, ``crop_scale=[0.3, 1.0]`` …).

    Raises:
        MedsslError: an unknown preset or option (the known ones named).
    """
    from medssl.transforms.batched import BatchedSSLAugment

    preset = method if ":" not in method else "simclr"
    try:
        return BatchedSSLAugment.for_method(preset, tuple(int(r) for r in roi_size), seed=int(seed) + _rank(),
                                            **overrides)
    except ValueError as e:
        raise MedsslError(f"augmentation of method {method!r}: {e}") from e


def run_tags(study: str | None = None, **extra: Any) -> dict[str, str]:
    """MLflow tags of a bundle run: ``medssl.study`` (when given), ``medssl.source = bundle`` and ``extra``
    (``None`` values dropped); the engine adds ``medssl.kind``, ``medssl.seed``, data hash and git sha."""
    tags = {"medssl.study": study, "medssl.source": "bundle", **extra}
    return {k: str(v) for k, v in tags.items() if v is not None}


def knn_probe(config: Any, encoder_path: str | Path, out_file: str | Path | None = None) -> dict[str, float]:
    """Score an ``encoder.pt`` with the representation monitor (:mod:`medssl.engines.pretrain.monitor`): leave-one-case-out
    kNN on the labelled cases of ``config``'s pretraining pool (never validation / test cases), the numbers
    ``monitor/knn_acc`` / ``monitor/knn_balanced_acc`` a run with ``monitor_every`` logs.

    Args:
        config: the run's :class:`~medssl.config.PretrainConfig` (datalist, splits, roi, preprocessing,
            ``monitor_cases``, ``monitor_k``).
        encoder_path: ``encoder.pt`` (``{"recipe", "state_dict"}``) of a pretraining run.
        out_file: JSON file the scores are written to (folders created).

    Raises:
        MedsslError: a missing / unreadable encoder file, or no labelled case in the pool.
    """
    from medssl.engines.pretrain.monitor import build_monitor
    from medssl.engines.pretrain.pool import load_pool
    from medssl.networks.encoders import rebuild_encoder

    path = Path(encoder_path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        encoder = rebuild_encoder(saved["recipe"]["encoder"])
        encoder.load_state_dict(saved["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise MedsslError(f"encoder {path} cannot be loaded for the kNN probe: {e}") from e
    pool = load_pool(config.datalist, config.sections, config.splits, config.split_seed)
    monitor = build_monitor(config, pool)
    if monitor is None:
        raise MedsslError(f"kNN probe of {path}: no case of the pool of {config.datalist} has a class or a label")
    scores = {**monitor.evaluate(encoder), **{f"monitor.{k}": v for k, v in monitor.describe().items()}}
    log.info("kNN probe of %s: %s", path, scores)
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(scores, indent=1))
    return scores
