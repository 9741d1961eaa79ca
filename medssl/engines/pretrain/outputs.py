"""What a pretraining run leaves behind: the :class:`PretrainResult`, its MLflow run (:func:`start_tracking`, used by
:class:`~medssl.engines.pretrain.handlers.MlflowLogger`) and the end-of-run outputs (:func:`write_outputs`:
``encoder.pt`` + ``encoder.json``, ``skipped_volumes.json``; :func:`run_artifacts`: the files a tracker logs).
Rank 0 writes; other ranks only fill their result's paths.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medssl.config import PretrainConfig, flatten_dict
from medssl.engines.pretrain.components import make_tracker
from medssl.engines.pretrain.pool import pool_fingerprint
from medssl.engines.runtime import checkpoint as ck
from medssl.engines.runtime import distributed as dd

__all__ = ["PretrainResult", "start_tracking", "write_outputs", "run_artifacts"]

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a pretraining run produced. ``loss_history`` holds ``(step, loss)`` of the steps run here
    (1-based optimizer steps; skipped non-finite steps are absent); ``monitor_history`` holds ``(step,
    {"monitor/knn_acc", ...})`` of the representation monitor's evaluations here (step 0 = before training)."""

    out_dir: Path
    last_checkpoint: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    encoder_path: Path | None = None
    encoder_json: Path | None = None
    run_id: str | None = None
    final_loss: float | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    skipped_volumes: dict[str, str] = field(default_factory=dict)
    monitor_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    #: wall seconds of this process's steps (a resumed run: since the resume): ``train_s`` (optimizer steps incl.
    #: batching and augmentation), ``steps``, ``s_per_step``, ``handlers_s`` (monitor, checkpoints, logging); what
    #: ``medssl pretrain --dry-run`` estimates, measured
    timing: dict[str, float] = field(default_factory=dict)


def start_tracking(
    config: PretrainConfig,
    pool: list[dict[str, Any]],
    out_dir: Path,
    *,
    run_id: str | None,
    fresh: bool,
    preview: Path | None = None,
) -> Any:
    """The run's MLflow tracker (``None`` without ``config.experiment``): a new run, or ``run_id``'s on resume;
    a ``fresh`` run logs the flat config as params; ``preview`` (the augmentation PNG) is logged as an artifact."""
    if not config.experiment:
        return None
    tracker = make_tracker(config, pool_fingerprint(pool), out_dir, run_id)
    from medssl.engines.runtime.checkpoint import machine_tag

    tracker.set_tags({"medssl.machine": machine_tag()})  # the latest (re)start's machine (runtime.checkpoint)
    if fresh:
        tracker.log_params(flatten_dict(config.to_dict()))
    if preview is not None:
        tracker.log_artifact(preview)
    return tracker


def _image_name(image: str | list[str]) -> str:
    """A pool item's image as one string (channel files joined by `` + ``)."""
    return " + ".join(image) if isinstance(image, list) else image


def write_outputs(
    result: PretrainResult,
    *,
    out_dir: Path,
    encoder: torch.nn.Module,
    recipe: dict[str, Any],
    pool: list[dict[str, Any]],
    skipped: dict[int, str],
    dist: dd.DistInfo,
) -> PretrainResult:
    """Fill ``result`` (final loss, skipped volumes of every rank, encoder paths) and, on rank 0, write the
    encoder (:func:`~medssl.engines.runtime.checkpoint.save_encoder`) and ``skipped_volumes.json``. Under DDP
    every rank calls it (one all-gather, a barrier). Tracking them is the handlers' (:func:`run_artifacts`).

    Args:
        result: the run's result so far (``loss_history``, checkpoints).
        out_dir: the run folder.
        encoder: the trained encoder.
        recipe: its recipe (written to ``encoder.json``).
        pool: the pretraining pool (names of skipped volumes).
        skipped: this rank's unreadable volumes, pool index → reason (``CropBatcher.skipped``).
        dist: this process's rank information.
    """
    r = result
    r.final_loss = r.loss_history[-1][1] if r.loss_history else None
    every = dd.all_gather_objects(skipped) if dist.enabled else [skipped]
    r.skipped_volumes = {_image_name(pool[i]["image"]): why for s in every for i, why in s.items()}
    if not dist.is_main:
        r.encoder_path, r.encoder_json = out_dir / "encoder.pt", out_dir / "encoder.json"
        dd.barrier()  # rank 0 writes the encoder
        return r
    r.encoder_path, r.encoder_json = ck.save_encoder(out_dir, encoder, recipe)
    if r.skipped_volumes:
        (out_dir / "skipped_volumes.json").write_text(json.dumps(r.skipped_volumes, indent=1))
    dd.barrier()
    return r


def run_artifacts(result: PretrainResult, out_dir: Path) -> list[tuple[Path, str | None]]:
    """The end-of-run files a tracker logs, ``(file, folder in the tracker or None)`` in order:
    ``skipped_volumes.json`` (when volumes were skipped), ``encoder/encoder.pt``, ``encoder/encoder.json``,
    ``config.yaml``."""
    files: list[tuple[Path, str | None]] = [(out_dir / "skipped_volumes.json", None)] if result.skipped_volumes else []
    files += [(p, "encoder") for p in (result.encoder_path, result.encoder_json) if p is not None]
    return [*files, (out_dir / "config.yaml", None)]
