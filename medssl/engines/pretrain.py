"""SSL pretraining engine: one readable step, exact resume, MLflow tracking.

Why a plain loop and not Ignite's ``Engine`` / MONAI's ``SupervisedTrainer``: exact resume needs the
data position *inside* an epoch. Ignite's ``Engine`` restarts the epoch's data on resume, and its
``DeterministicEngine`` reaches a mid-epoch iteration by iterating the data loader again up to it
(re-loading and re-augmenting every skipped batch); and the step must interleave a non-finite guard,
grad accumulation, GradScaler and the method's EMA hook in a fixed order that MONAI's trainer
iteration (one forward/backward per batch) does not expose. Here the whole step fits on one screen
(:meth:`Pretrainer.train_step`), the data stream is a pure function of ``(seed, epoch, position)``
(:class:`~medssl.engines.data.CropBatcher`), and one dict holds every state
(:mod:`medssl.engines.checkpoint`). MONAI provides the data side (``CacheDataset``, readers,
orientation/spacing/intensity transforms).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import PretrainConfig, flatten_dict
from medssl.engines import checkpoint as ck
from medssl.engines.components import build_components, make_recipe, resolve_device
from medssl.engines.data import CropBatcher, SafeCacheDataset, load_pool, pool_fingerprint, preprocessing
from medssl.engines.progress import ProgressBar
from medssl.engines.schedules import WarmupCosineSchedule
from medssl.errors import MedsslError

__all__ = ["PretrainResult", "Pretrainer", "run_pretraining", "build_components", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a pretraining run produced. ``loss_history`` holds ``(step, loss)`` of the steps run here
    (1-based optimizer steps; skipped non-finite steps are absent)."""

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


class Pretrainer:
    """Owns the optimizer, schedule, scaler, data stream and tracker of one pretraining run.

    Args:
        config: the run config.
        encoder: the encoder (a submodule of ``method``).
        method: ``nn.Module``; ``method(batch) -> {"loss": scalar, <float logs>}``, optional
            ``on_step_end(step, total_steps)``.
        augment: ``augment(volumes) -> batch dict`` on the volumes' device; ``volumes`` is a list of
            ``(C, D_i, H_i, W_i)`` tensors (sizes may differ), as ``BatchedSSLAugment`` takes.
    """

    def __init__(
        self,
        config: PretrainConfig,
        encoder: torch.nn.Module,
        method: torch.nn.Module,
        augment: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    ) -> None:
        self.cfg, self.encoder, self.augment = config, encoder, augment
        self.device = resolve_device(config.device)
        self.method = method.to(self.device)
        self.out = Path(config.out_dir)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp or "")
        if self.amp_dtype is not None and self.device.type != "cuda":
            log.warning("amp=%s ignored on %s (AMP runs on CUDA only)", config.amp, self.device)
            self.amp_dtype = None
        self.pool = load_pool(config.datalist, config.sections, config.splits, config.split_seed)
        self.dataset = SafeCacheDataset(
            self.pool,
            preprocessing(config.normalisation, config.target_spacing, config.ct_window),
            cache_rate=config.cache_rate,
            num_workers=max(1, config.num_workers),
            runtime_cache=config.num_workers == 0,
            copy_cache=False,
            progress=False,
        )
        self.batcher = CropBatcher(self.dataset, config.source_size, seed=config.seed)
        per_step = config.batch_size * config.grad_accum
        self.total_steps = config.total_steps or config.epochs * math.ceil(len(self.pool) / per_step)
        decay = [p for p in self.method.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.method.parameters() if p.requires_grad and p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        self.schedule = WarmupCosineSchedule(
            self.optimizer, config.lr, config.min_lr, self.total_steps, config.warmup_steps
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.recipe = make_recipe(config, encoder)
        self.step, self.nan_run, self.tracker, self.checkpoints = 0, 0, None, []
        self.result = PretrainResult(out_dir=self.out)

    # -- one optimizer step (schedule → forward → guard → backward/accum/clip → step → EMA) ------------
    def train_step(self) -> dict[str, float] | None:
        """Run optimizer step ``self.step``; returns its logs, or ``None`` if skipped (non-finite loss)."""
        cfg, accum = self.cfg, self.cfg.grad_accum
        lr = self.schedule.apply()
        logs: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            images = [v.to(self.device, non_blocking=True) for v in self.batcher.next_batch(cfg.batch_size)]
            batch = self.augment(images)
            autocast = (
                torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
            )
            with autocast:
                out = self.method(batch)
            loss = out["loss"]
            value = float(loss.detach())
            if not math.isfinite(value):
                return self._skip(value)
            self.scaler.scale(loss / accum).backward()
            for k, v in out.items():  # logs stay on device until the one sync below
                logs[k] = logs.get(k, 0.0) + torch.as_tensor(v).detach().float() / accum
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step, self.nan_run = self.step + 1, 0
        if hasattr(self.method, "on_step_end"):  # e.g. EMA teacher; step = optimizer steps done (1-based)
            self.method.on_step_end(self.step, self.total_steps)
        values = torch.stack([v.to(self.device) for v in logs.values()]).tolist()
        return {**dict(zip(logs, values, strict=True)), "lr": lr}

    def _skip(self, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step, self.nan_run = self.step + 1, self.nan_run + 1
        self.result.skipped_steps.append(self.step)
        log.warning(
            "step %d: non-finite loss (%s); step skipped (%d in a row)", self.step, value, self.nan_run
        )
        if self.tracker:
            self.tracker.log_metrics({"skipped_nonfinite": 1.0}, self.step)
        if self.nan_run >= self.cfg.max_nan_steps:
            raise MedsslError(
                f"{self.nan_run} consecutive steps had a non-finite loss (last at step {self.step}, "
                f"max_nan_steps={self.cfg.max_nan_steps}); lower lr, enable grad_clip or use "
                f"amp=bf16 instead of fp16. Last good checkpoint: {self._last_path()}"
            )
        return None

    # -- checkpoints ----------------------------------------------------------------------------------
    def _last_path(self) -> Path | None:
        p = self.out / "checkpoints" / "last.pt"
        return p if p.exists() else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "recipe": self.recipe,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "augment": ck.component_state(self.augment),
            "rng": ck.capture_rng(),
            "data": self.batcher.state_dict(),
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }

    def save_checkpoint(self) -> Path:
        """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically; prune old periodic ones."""
        state, folder = self.state_dict(), self.out / "checkpoints"
        path = ck.atomic_save(state, folder / f"step_{self.step:07d}.pt")
        ck.atomic_save(state, folder / "last.pt")
        self.checkpoints.append(path)
        while len(self.checkpoints) > max(1, self.cfg.keep_checkpoints):
            self.checkpoints.pop(0).unlink(missing_ok=True)
        log.info("checkpoint %s", path)
        return path

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, schedule, scaler, augmentation, RNG and data position from ``path``.

        Raises:
            ConfigMismatchError: the checkpoint is of another method/encoder/input size (both named).
        """
        state = ck.load_checkpoint(path, map_location="cpu")  # RNG states must stay on the CPU
        ck.check_recipe(state["recipe"], self.recipe)
        changed = {
            k: (v, self.cfg.to_dict().get(k))
            for k, v in state.get("config", {}).items()
            if self.cfg.to_dict().get(k) != v
        }
        if changed:
            log.info("resuming with changed config fields: %s", changed)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.schedule.total_steps = self.total_steps
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ck.load_component_state(self.augment, state.get("augment"))
        self.batcher.load_state_dict(state["data"])
        ck.restore_rng(state["rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return state

    # -- the run --------------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, progress: bool = True) -> PretrainResult:
        """Train to ``total_steps`` (from checkpoint ``resume`` if given); see :func:`run_pretraining`."""
        self.out.mkdir(parents=True, exist_ok=True)
        run_id = self.resume(resume).get("mlflow_run_id") if resume else None
        if resume:
            self._truncate_metrics_log()
        self.cfg.to_yaml(self.out / "config.yaml")
        prev_det = torch.are_deterministic_algorithms_enabled()
        if self.cfg.deterministic:
            if self.device.type == "cuda":  # required by deterministic cuBLAS
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.method.train()
        try:
            self._start_tracking(run_id, fresh=resume is None)
            with (
                ProgressBar(progress, self.total_steps, self.step) as bar,
                open(self.out / "metrics.jsonl", "a") as mf,
            ):
                while self.step < self.total_steps:
                    logs = self.train_step()
                    if logs is not None:
                        self.result.loss_history.append((self.step, logs["loss"]))
                        mf.write(json.dumps({"step": self.step, **logs}) + "\n")
                        mf.flush()
                        if self.tracker and self.step % self.cfg.log_every == 0:
                            self.tracker.log_metrics(logs, self.step)
                        bar(self.step, logs["loss"])
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save_checkpoint()
            self._finish()
        except BaseException as e:
            if self.tracker:
                self.tracker.set_tags({"medssl.error": f"{type(e).__name__}: {e}"[:1000]})
                self.tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            torch.use_deterministic_algorithms(prev_det)
        return self.result

    def _truncate_metrics_log(self) -> None:
        """Drop ``metrics.jsonl`` lines of steps after the resumed one (written before a crash)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [x for x in path.read_text().splitlines() if x.strip()]
            kept = [x for x in lines if json.loads(x).get("step", 0) <= self.step]
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, path)

    def _finish(self) -> None:
        if not self.checkpoints or self.checkpoints[-1].name != f"step_{self.step:07d}.pt":
            self.save_checkpoint()
        r = self.result
        r.last_checkpoint, r.checkpoints = self._last_path(), list(self.checkpoints)
        r.encoder_path, r.encoder_json = ck.save_encoder(self.out, self.encoder, self.recipe)
        r.final_loss = r.loss_history[-1][1] if r.loss_history else None
        r.skipped_volumes = {self.pool[i]["image"]: why for i, why in self.batcher.skipped.items()}
        skipped_file = self.out / "skipped_volumes.json"
        if r.skipped_volumes:
            skipped_file.write_text(json.dumps(r.skipped_volumes, indent=1))
        if self.tracker:
            if r.skipped_volumes:
                self.tracker.log_artifact(skipped_file)
            for p in (r.encoder_path, r.encoder_json):
                self.tracker.log_artifact(p, "encoder")
            self.tracker.log_artifact(self.out / "config.yaml")
            self.tracker.log_metrics({"skipped_volumes": float(len(r.skipped_volumes))}, self.step)
            self.tracker.close("FINISHED")
            r.run_id = self.tracker.run_id

    def _start_tracking(self, run_id: str | None, fresh: bool) -> None:
        preview = self._preview() if fresh and self.cfg.preview else None
        if not self.cfg.experiment:
            return
        from medssl.tracking.mlflow_tracker import MlflowTracker, standard_tags

        tags = {
            **standard_tags("pretrain", seed=self.cfg.seed, data_hash=pool_fingerprint(self.pool)),
            **self.cfg.tags,
            "medssl.method": self.cfg.method,
            "medssl.encoder": self.cfg.encoder,
        }
        self.tracker = MlflowTracker(
            self.cfg.experiment,
            run_name=self.cfg.run_name or self.out.name,
            tracking_uri=self.cfg.tracking_uri,
            tags=tags,
            run_id=run_id,
            parent_run_id=self.cfg.parent_run_id,
            spool_path=self.out / "mlflow_spool.jsonl",
        )
        self.result.run_id = self.tracker.run_id
        if fresh:
            self.tracker.log_params(flatten_dict(self.cfg.to_dict()))
        if preview is not None:
            self.tracker.log_artifact(preview)

    def _preview(self) -> Path | None:
        """``augment_preview.png`` from a side batcher; RNG/augmentation states are restored afterwards so
        training is unaffected. A failure only warns."""
        from medssl.engines.preview import save_augment_preview

        rng, aug = ck.capture_rng(), ck.component_state(self.augment)
        try:
            side = CropBatcher(self.dataset, self.cfg.source_size, seed=self.cfg.seed + 1)
            with torch.no_grad():
                batch = self.augment([v.to(self.device) for v in side.next_batch(4)])
            return save_augment_preview(batch, self.out / "augment_preview.png")
        except Exception as e:  # noqa: BLE001 - a preview must never stop a run
            log.warning("augmentation preview failed: %s", e)
            return None
        finally:
            ck.restore_rng(rng)
            ck.load_component_state(self.augment, aug)


def run_pretraining(
    config: PretrainConfig, *, resume: str | Path | None = None, progress: bool = True
) -> PretrainResult:
    """Pretrain an encoder with an SSL method; the library entry point behind ``medssl pretrain``.

    Seeds Python/NumPy/torch with ``config.seed``, builds encoder/method/augmentation
    (:func:`build_components`), trains with checkpoints every ``config.checkpoint_every`` steps,
    and writes ``encoder.pt`` + ``encoder.json`` under ``config.out_dir``.

    Args:
        config: the run config.
        resume: a checkpoint (``.../checkpoints/last.pt``) to continue from exactly.
        progress: show a rich progress bar.

    Raises:
        MedsslError: unusable data, K consecutive non-finite losses, unreadable checkpoint.
        ConfigMismatchError: ``resume`` is a checkpoint of another method/encoder.
    """
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    encoder, method, augment = build_components(config)
    return Pretrainer(config, encoder, method, augment).fit(resume=resume, progress=progress)
