"""SSL pretraining engine: one readable step, exact resume, MLflow tracking.

Why a plain loop and not Ignite's ``Engine`` / MONAI's ``SupervisedTrainer``: exact resume needs the data position
*inside* an epoch (Ignite restarts the epoch's data on resume; its ``DeterministicEngine`` re-iterates the loader up
to the iteration, re-loading and re-augmenting every skipped batch), and the step interleaves a non-finite guard,
grad accumulation, GradScaler and the method's EMA hook in a fixed order that MONAI's trainer iteration does not
expose. The step fits on one screen (:meth:`Pretrainer.train_step`), the data stream is a pure function of
``(seed, epoch, position)`` (:class:`~medssl.engines.pretrain.data.CropBatcher`) and one dict holds every state
(:mod:`medssl.engines.runtime.checkpoint`); MONAI provides the data side. ``tests/engines/pretrain/
test_monai_resume_gap.py`` shows the gap on real volumes: MONAI's trainer resumed by ``CheckpointLoader`` re-reads the
epoch's first batches and re-seeds the random transforms, where this loop's resumed losses equal the straight run's.

State: :class:`~medssl.engines.pretrain.state.PretrainCheckpointer`; checkpoint timing, ``metrics.jsonl``, MLflow,
kNN monitor, preview and progress bar are handlers on Ignite-named events (:mod:`~medssl.engines.pretrain.handlers`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from medssl.config import PretrainConfig
from medssl.engines.pretrain.components import (
    PretrainParts,
    as_schedule,
    build_augment,
    build_components,
    check_optimizer,
    config_for_parts,
    make_recipe,
    param_groups,
    place_model,
    to_memory_format,
)
from medssl.engines.pretrain.data import CropBatcher, preprocessing, preprocessing_recipe
from medssl.engines.pretrain.events import Events, PretrainState, check_handlers, fire, fire_exception
from medssl.engines.pretrain.handlers import default_handlers
from medssl.engines.pretrain.outputs import PretrainResult, run_artifacts, write_outputs
from medssl.engines.pretrain.pool import load_pool, pool_record, resolve_in_channels
from medssl.engines.pretrain.pool_cache import make_pool_dataset, shard_indices
from medssl.engines.pretrain.state import PretrainCheckpointer
from medssl.engines.runtime import checkpoint as ck
from medssl.engines.runtime import distributed as dd
from medssl.engines.runtime.ledger import LEDGER_FILE, config_key, recorded_run
from medssl.engines.runtime.preemption import Preempted, PreemptionHandler
from medssl.engines.runtime.schedules import WarmupCosineSchedule
from medssl.errors import MedsslError

__all__ = ["Pretrainer", "run_pretraining"]

log = logging.getLogger(__name__)


class Pretrainer:
    """Owns the optimizer, schedule, scaler and data stream of one pretraining run, holds its checkpointer
    (``self.checkpointer``: :class:`~medssl.engines.pretrain.state.PretrainCheckpointer`) and calls its handlers.

    Under ``torchrun`` (an initialised process group, see :func:`run_pretraining`) the method runs in
    ``DistributedDataParallel`` (``self.model``; ``self.method`` stays the plain module), each rank
    reads its own shard of every epoch, logs are averaged over ranks, and only rank 0 writes
    checkpoints, ``metrics.jsonl``, the encoder and MLflow. A checkpoint holds every rank's RNG,
    augmentation and data states (``"ranks"``), so a resume on the same number of ranks is exact.

    ``self.state`` (:class:`~medssl.engines.pretrain.events.PretrainState`) is what the handlers read;
    ``self.step`` is its ``iteration``.

    Args:
        config: the run config.
        encoder: the encoder (a submodule of ``method``).
        method: ``nn.Module``; ``method(batch) -> {"loss": scalar, <float logs>}``, optional
            ``on_step_end(step, total_steps)``.
        augment: ``augment(volumes) -> batch dict`` on the volumes' device; ``volumes`` is a list of
            ``(C, D_i, H_i, W_i)`` tensors (sizes may differ), as ``BatchedSSLAugment`` takes.
        pool: the pretraining pool (:func:`~medssl.engines.pretrain.pool.load_pool`); loaded from the config if
            ``None``. ``config.in_channels=None`` resolves to its channel count; the recipe records it
            (``recipe["pool"]``: case ids, fingerprint, splits sha256).
        optimizer: an optimizer over ``method``'s parameters; ``None``: AdamW with weight decay on the
            ≥ 2-D parameters only (``config.lr``, ``config.weight_decay``).
        schedule: the lr schedule (:func:`~medssl.engines.pretrain.components.as_schedule`); ``None``:
            :class:`~medssl.engines.runtime.schedules.WarmupCosineSchedule` from the config.
        handlers: called in order on every event (:mod:`medssl.engines.pretrain.events`); ``None``:
            :func:`~medssl.engines.pretrain.handlers.default_handlers` (what ``medssl pretrain`` runs).
    """

    def __init__(
        self,
        config: PretrainConfig,
        encoder: torch.nn.Module,
        method: torch.nn.Module,
        augment: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        pool: list[dict[str, Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Any | None = None,
        handlers: Sequence[Any] | None = None,
    ) -> None:
        self.handlers = None if handlers is None else check_handlers(handlers)  # refused before any data is read
        self._active: list[Any] = self.handlers or []  # fit() puts the defaults here when none were given
        if pool is None:
            pool = load_pool(config.datalist, config.sections, config.splits, config.split_seed)
        self.pool, config = pool, resolve_in_channels(config, pool)
        self.cfg, self.encoder, self.augment = config, encoder, augment
        self.dist = dd.dist_info()
        self.method, self.device, self.amp_dtype, self.channels_last = place_model(
            config, method, self.dist.local_rank if self.dist.enabled else None
        )
        self.out = Path(config.out_dir)
        # each rank builds its dataset over the pool indices it can draw (all of them unless data_shard="pool")
        shard = shard_indices(len(self.pool), config.seed, self.dist.rank, self.dist.world_size, config.data_shard)
        prep = preprocessing_recipe(config.normalisation, config.target_spacing, config.ct_window)
        self.dataset = make_pool_dataset(
            self.pool, preprocessing(config.normalisation, config.target_spacing, config.ct_window),
            cache=config.cache, cache_dir=config.cache_dir, prep=prep, cache_rate=config.cache_rate,
            num_workers=config.num_workers, indices=shard if len(shard) < len(self.pool) else None,
        )  # fmt: skip
        self.batcher = CropBatcher(
            self.dataset, config.source_size, config.seed, self.dist.rank, self.dist.world_size, config.data_shard
        )
        epoch_length = math.ceil(len(self.pool) / (config.batch_size * config.grad_accum * self.dist.world_size))
        self.total_steps = config.total_steps or config.epochs * epoch_length
        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(
            param_groups(self.method, config.weight_decay), lr=config.lr
        )
        check_optimizer(self.optimizer, self.method)
        self.schedule = as_schedule(schedule) if schedule is not None else WarmupCosineSchedule(
            self.optimizer, config.lr, config.min_lr, self.total_steps, config.warmup_steps
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.model = dd.wrap_ddp(
            self.method, self.device, config.sync_batchnorm, config.ddp_find_unused_parameters
        )
        if config.compile:
            self.model = torch.compile(self.model)
        # the pool is part of the recipe: finetuning refuses an encoder that saw its validation/test cases
        self.recipe = make_recipe(config, encoder) | {"pool": pool_record(pool, config.splits, config.split_seed)}
        self.checkpointer = PretrainCheckpointer(
            self.out, config=config, recipe=self.recipe, method=self.method, optimizer=self.optimizer,
            schedule=self.schedule, scaler=self.scaler, augment=augment, batcher=self.batcher, dist=self.dist,
            keep=config.keep_checkpoints,
        )  # fmt: skip
        self.state = PretrainState(max_iterations=self.total_steps, epoch_length=epoch_length)
        self.nan_run, self.compile_s = 0, None  # compile_s: torch.compile's first (compiling) step, seconds
        self.result = PretrainResult(out_dir=self.out)

    @property
    def step(self) -> int:
        """Optimizer steps done (``state.iteration``)."""
        return self.state.iteration

    @step.setter
    def step(self, value: int) -> None:
        self.state.iteration = int(value)

    def fire(self, event: Events) -> None:
        """Call ``handler.<event>(self)`` on every handler that has it, in list order (:func:`fire`)."""
        fire(self._active, event, self)

    # -- checkpoints (the held PretrainCheckpointer) ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict at this step (:meth:`PretrainCheckpointer.state_dict`; DDP: every rank calls it)."""
        return self.checkpointer.state_dict(self.step, self.state.run_id)

    def save_checkpoint(self) -> Path:
        """Fire ``CHECKPOINT_SAVING``, write ``step_XXXXXXX.pt`` + ``last.pt`` of this step
        (:meth:`PretrainCheckpointer.save`; DDP: every rank calls it), then fire ``CHECKPOINT_SAVED``."""
        self.fire(Events.CHECKPOINT_SAVING)  # the loggers make durable what a resume from it will not redo
        self.state.checkpoint = path = self.checkpointer.save(self.step, self.state.run_id)
        self.fire(Events.CHECKPOINT_SAVED)
        return path

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Continue exactly from checkpoint ``path`` (:meth:`PretrainCheckpointer.resume`); returns its dict."""
        state = self.checkpointer.resume(path, total_steps=self.total_steps)
        self.step = int(state["step"])
        self.state.resumed, self.state.resumed_run_id = True, state.get("mlflow_run_id")
        return state

    # -- one optimizer step (schedule → forward → guard → backward/accum/clip → step → EMA) ------------
    def train_step(self) -> dict[str, float] | None:
        """Run optimizer step ``self.step``; returns its logs, or ``None`` if skipped (non-finite loss)."""
        cfg, accum = self.cfg, self.cfg.grad_accum
        lr = self.schedule.apply()
        logs: dict[str, torch.Tensor] = {}
        for i in range(accum):
            images = [v.to(self.device, non_blocking=True) for v in self.batcher.next_batch(cfg.batch_size)]
            batch = to_memory_format(self.augment(images), self.channels_last)
            autocast = (
                torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
            )
            # DDP: all-reduce gradients only on the last micro-batch of the step
            no_sync = getattr(self.model, "no_sync", None) if i < accum - 1 else None
            with no_sync() if no_sync else nullcontext():
                with autocast:
                    out = self.model(batch)
                loss = out["loss"]
                value = float(loss.detach())
                if dd.any_across_ranks(not math.isfinite(value), self.device):  # every rank skips alike
                    if self.dist.enabled:  # finish DDP's pending reduction; the gradients are dropped
                        (loss * 0.0).backward()
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
        values = dd.mean_across_ranks(torch.stack([v.to(self.device) for v in logs.values()])).tolist()
        return {**dict(zip(logs, values, strict=True)), "lr": lr}

    def _skip(self, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step, self.nan_run = self.step + 1, self.nan_run + 1
        self.result.skipped_steps.append(self.step)
        where = " on at least one rank; here" if self.dist.enabled else ""
        log.warning("step %d: non-finite loss%s (%s); step skipped (%d in a row)", self.step, where, value, self.nan_run)
        self.state.output = None
        self.fire(Events.ITERATION_SKIPPED)
        if self.nan_run >= self.cfg.max_nan_steps:
            raise MedsslError(
                f"{self.nan_run} consecutive steps had a non-finite loss (last at step {self.step}, "
                f"max_nan_steps={self.cfg.max_nan_steps}); lower lr, enable grad_clip or use "
                f"amp=bf16 instead of fp16. Last good checkpoint: {self.checkpointer.last_path()}"
            )
        return None

    # -- the run --------------------------------------------------------------------------------------
    def fit(
        self,
        resume: str | Path | None = None,
        progress: bool = True,
        preemption: PreemptionHandler | None = None,
    ) -> PretrainResult:
        """Train to ``total_steps`` (from checkpoint ``resume`` if given), firing the handlers' events; see
        :func:`run_pretraining`. ``progress`` shows the progress bar of the default handlers (ignored when the
        handlers were given).

        With ``preemption`` (installed by the caller), a trapped signal makes the run checkpoint after the
        current optimizer step and raise :class:`~medssl.engines.runtime.preemption.Preempted` (every DDP rank stops
        after the same step)."""
        self._active = self.handlers if self.handlers is not None else default_handlers(progress)
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume(resume)
        if self.dist.is_main:
            self.cfg.to_yaml(self.out / "config.yaml")
        prev_det = torch.are_deterministic_algorithms_enabled()
        if self.cfg.deterministic:
            if self.device.type == "cuda":  # required by deterministic cuBLAS
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.method.train()
        try:
            self.state.clear_outputs()
            self.fire(Events.STARTED)
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                self.result.timing["train_s"] = self.result.timing.get("train_s", 0.0) + time.perf_counter() - t0
                self.result.timing["steps"] = self.result.timing.get("steps", 0.0) + 1
                if self.cfg.compile and self.compile_s is None and logs is not None:
                    self.compile_s = time.perf_counter() - t0  # first step = compile + one step
                    log.info("torch.compile: first step took %.1f s", self.compile_s)
                if logs is not None:
                    self.result.loss_history.append((self.step, logs["loss"]))
                self.state.clear_outputs()
                self.state.output = logs
                t1 = time.perf_counter()  # the handlers' share: monitor probes, checkpoints, logging
                self.fire(Events.ITERATION_COMPLETED)
                self.result.timing["handlers_s"] = self.result.timing.get("handlers_s", 0.0) + time.perf_counter() - t1
                if preemption is not None and self.step < self.total_steps and preemption.should_stop(
                    lambda flag: dd.any_across_ranks(flag, self.device)
                ):
                    self._preempted(preemption)
            if self.result.timing.get("steps"):
                self.result.timing["s_per_step"] = self.result.timing["train_s"] / self.result.timing["steps"]
            self._finish()
        except BaseException as e:
            fire_exception(self._active, self, e)
            raise
        finally:
            torch.use_deterministic_algorithms(prev_det)
        return self.result

    def _preempted(self, preemption: PreemptionHandler) -> None:
        """Checkpoint at this step boundary (unless just written) and raise ``Preempted``."""
        if not self.checkpointer.is_written(self.step):
            self.save_checkpoint()
        if self.dist.is_main:
            log.warning("preemption signal: checkpoint at step %d written; stopping", self.step)
        raise Preempted(preemption.signum, self.step, self.checkpointer.last_path())

    def _finish(self) -> None:
        """The encoder and run outputs (:func:`write_outputs`), then ``COMPLETED`` (their files in
        ``state.artifacts``, ``skipped_volumes`` in ``state.metrics``); all ranks leave together."""
        write_outputs(self.result, out_dir=self.out, encoder=self.encoder, recipe=self.recipe, pool=self.pool,
                      skipped=self.batcher.skipped, dist=self.dist)
        self.state.clear_outputs()
        self.state.output = None
        if self.dist.is_main:
            self.state.artifacts = run_artifacts(self.result, self.out)
            self.state.metrics = {"skipped_volumes": float(len(self.result.skipped_volumes))}
        self.fire(Events.COMPLETED)
        self.result.last_checkpoint = self.checkpointer.last_path()
        self.result.checkpoints = list(self.checkpointer.written)
        dd.barrier()


def run_pretraining(
    config: PretrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    preemption: PreemptionHandler | bool = True,
    parts: PretrainParts | None = None,
    handlers: Sequence[Any] | None = None,
) -> PretrainResult:
    """Pretrain an encoder with an SSL method; the library entry point behind ``medssl pretrain``.

    Seeds Python/NumPy/torch with ``config.seed``, builds encoder/method/augmentation
    (:func:`build_components`), trains with checkpoints every ``config.checkpoint_every`` steps,
    and writes ``encoder.pt`` + ``encoder.json`` under ``config.out_dir``.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group first (NCCL on CUDA with
    ``cuda:LOCAL_RANK``, Gloo on CPU), trains data-parallel (``batch_size`` is per rank; the global
    batch is ``world_size * batch_size * grad_accum``), and destroys the group at the end or on error.

    Args:
        config: the run config.
        resume: a checkpoint (``.../checkpoints/last.pt``) to continue from exactly, or ``"auto"``
            (``out_dir/checkpoints/last.pt`` when it exists, else a fresh start in the MLflow run the folder's
            ``checkpoints/mlflow.json`` names for the same config: what a requeued job passes). A resumed run
            sends no metric step its MLflow run already holds (:mod:`medssl.engines.runtime.ledger`).
        progress: show a rich progress bar.
        preemption: trap SIGUSR1/SIGTERM during training (``True``: a fresh
            :class:`~medssl.engines.runtime.preemption.PreemptionHandler`), a handler of the caller's, or ``False``.
            A trapped signal → checkpoint at the next step, then ``Preempted`` (CLI exit code 75).
        parts: method / augmentation / optimizer / scheduler built by the caller (a bundle config) instead of
            from the config; the config's method/encoder fields are set from them
            (:func:`~medssl.engines.pretrain.components.config_for_parts`). The caller seeds before building them.
        handlers: what runs on the loop's events (:mod:`medssl.engines.pretrain.events`), in order; ``None``: the
            CLI's :func:`~medssl.engines.pretrain.handlers.default_handlers` (preview, kNN monitor, ``metrics.jsonl``,
            MLflow, progress bar, checkpoints). A list drops what it omits (e.g. no MLflow logger: nothing tracked).

    Raises:
        MedsslError: unusable data, K consecutive non-finite losses, unreadable checkpoint.
        ConfigMismatchError: ``resume`` is a checkpoint of another method/encoder.
    """
    auto = resume is not None and str(resume) == "auto"
    if auto:
        last = Path(config.out_dir) / "checkpoints" / "last.pt"
        resume = last if last.exists() else None
    handler = PreemptionHandler() if preemption is True else (preemption or None)
    info, created = dd.init_distributed(config.device)
    trainer = encoder = method = augment = None
    try:
        pool = load_pool(config.datalist, config.sections, config.splits, config.split_seed)
        config = resolve_in_channels(config, pool)  # in_channels=None → the datalist's channel count
        optimizer = schedule = None
        if parts is None:
            ck.seed_all(config.seed)  # same model init on every rank (DDP also broadcasts rank 0's)
            encoder, method, augment = build_components(config, rank=info.rank, world_size=info.world_size)
        else:
            config = resolve_in_channels(config_for_parts(config, parts), pool)
            method, encoder, optimizer, schedule = parts.method, parts.method.encoder, parts.optimizer, parts.scheduler
            augment = parts.augment if parts.augment is not None else build_augment(config, rank=info.rank)
        if info.enabled:
            ck.seed_all(config.seed + info.rank)  # ranks draw different dropout/augmentation randomness
        trainer = Pretrainer(config, encoder, method, augment, pool, optimizer=optimizer, schedule=schedule,
                             handlers=handlers)
        if auto and resume is None:  # stopped before its first checkpoint: its MLflow run, if the folder names one
            trainer.state.resumed_run_id = recorded_run(trainer.out / LEDGER_FILE, config_key(trainer.cfg))
        if handler is None:
            return trainer.fit(resume=resume, progress=progress)
        with handler:
            return trainer.fit(resume=resume, progress=progress, preemption=handler)
    finally:
        # the DDP reducer (inside trainer / method) must be freed before its Gloo group is destroyed: freed after
        # destroy_process_group, a rank hung at exit after a finished run (seen under torchrun on the local SLURM
        # cluster and in benchmarks/pool_scale.py)
        del trainer, encoder, method, augment, parts, handlers
        if created:
            gc.collect()
            dd.cleanup_distributed()
