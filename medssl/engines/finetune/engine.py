"""Finetuning engine behind ``medssl finetune``: one (fraction, init, seed) run of segmentation or
classification, selected on validation only, evaluated once on the fixed test set.

Same shape as the pretraining engine (:mod:`medssl.engines.pretrain.engine`): a plain loop whose step reads top
to bottom (SSL freeze switch → schedule → encoder warm-up → forward under autocast → non-finite guard →
backward / clip / step), one checkpoint dict with every state, MLflow through :class:`~medssl.tracking.mlflow_tracker.MlflowTracker`.
Checkpoints are written at epoch ends (``checkpoints/last.pt``) and the epoch's random transforms and
order are functions of ``(seed, epoch)`` (:mod:`medssl.engines.finetune.data`), so a resumed run
reproduces the uninterrupted one exactly (CPU, ``deterministic=True``, ``num_workers=0``).

Files under ``out_dir``: ``config.yaml`` (resolved: the preprocessing actually used), ``checkpoints/last.pt``,
``checkpoints/best.pt`` (``{"recipe", "config", "epoch", "model", "val"}``, rebuild with
:func:`rebuild_model`), ``transfer_report.json`` (SSL init) and ``results.json``.

The `Finetuner` holds its parts as objects built from plain arguments: a
:class:`~medssl.engines.finetune.evaluation.FinetuneEvaluator` (metrics), a
:class:`~medssl.engines.finetune.evaluation.Selection` (best on validation, early stopping) and a
:class:`~medssl.engines.finetune.state.FinetuneCheckpointer` (``best.pt`` / ``last.pt``, exact resume); the result
type and the MLflow run are in :mod:`medssl.engines.finetune.result`; what the run already logged (a resume sends
each metric step once) is the :class:`~medssl.engines.runtime.ledger.MetricLedger` that
:mod:`medssl.engines.finetune.ledger` opens with the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Subset

from medssl.engines.finetune.augment import trained_flip_axes
from medssl.engines.finetune.build import build_model, param_groups
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import (
    class_weights,
    epoch_loader,
    eval_transforms,
    make_dataset,
    run_items,
    run_length,
    seed_epoch,
    train_transforms,
)
from medssl.engines.finetune.ema import WeightEMA
from medssl.engines.finetune.evaluation import FinetuneEvaluator, Selection
from medssl.engines.finetune.identity import run_config_hash
from medssl.engines.finetune.leakage import check_pretrain_leakage
from medssl.engines.finetune.ledger import close_run, open_run
from medssl.engines.finetune.metrics import as_tensor
from medssl.engines.finetune.mix import bidirectional_copy_paste, copy_paste_pairs, mix_generator
from medssl.engines.finetune.plan import resolve_plan, training_sampling
from medssl.engines.finetune.pseudo import PseudoLabels, labelled_repeats
from medssl.engines.finetune.result import FinetuneResult, fmt_metrics, log_run_start
from medssl.engines.finetune.state import FinetuneCheckpointer
from medssl.engines.finetune.tta import FlipTTAInferer
from medssl.engines.pretrain.components import resolve_device
from medssl.engines.runtime import checkpoint as ck
from medssl.engines.runtime.ledger import MetricLedger
from medssl.engines.runtime.preemption import Preempted, PreemptionHandler
from medssl.engines.runtime.progress import ProgressBar
from medssl.engines.runtime.schedules import WarmupCosineSchedule, resolve_ssl_schedule
from medssl.errors import MedsslError

__all__ = ["Finetuner", "run_finetune"]

log = logging.getLogger(__name__)


class Finetuner:
    """Owns model, data, optimizer, schedule and scaler of one finetuning run, and holds its evaluator
    (``self.evaluator``), best-on-validation selection (``self.selection``) and checkpointer
    (``self.checkpointer``).

    Args:
        config: the run config (preprocessing fields may be ``None``: resolved from the SSL recipe).
        tracker: an open :class:`~medssl.tracking.mlflow_tracker.MlflowTracker` or ``None``.
        ledger: what the tracker's run already holds (:class:`~medssl.engines.runtime.ledger.MetricLedger`);
            metrics at or below a key's logged step are not sent again. ``None``: everything is sent.
    """

    preemption: PreemptionHandler | None = None  # set by run_finetune: a signal stops before the next step

    def __init__(self, config: FinetuneConfig, *, tracker: Any = None, ledger: MetricLedger | None = None) -> None:
        from medssl.networks.downstream import freeze_encoder
        from medssl.networks.transfer import EncoderWarmup

        # the run's seed, not the caller's RNG state, decides the initial weights: a Finetuner built in a process
        # that already ran another (a sweep, a bundle, a test) starts from the same weights as a fresh one
        ck.seed_all(config.seed)
        self.tracker, self.ledger, self.device = tracker, ledger, resolve_device(config.device)
        self.seg = config.task == "segmentation"
        self.items, channels = run_items(config)
        config, self.plan = resolve_plan(config, self.items)  # "auto" fields planned; unfit recipes refused
        model, self.recipe, report, pre = build_model(config.replace(in_channels=channels))
        self.transfer = report.to_dict() if report is not None else None
        if config.ssl_source is not None:  # refuse an encoder pretrained on this run's validation/test cases
            check_pretrain_leakage(
                {"pool": self.recipe["ssl_pool"]},
                [it["case_id"] for it in self.items["validation"]],
                [it["case_id"] for it in self.items["test"]],
                source=str(config.ssl_source),
            )
        self.cfg = cfg = config.replace(
            normalisation=pre["normalisation"],
            target_spacing=pre.get("target_spacing"),
            ct_window=pre["ct_window"],
            in_channels=channels,
        )
        # self-training: the teacher's pseudo-labels of the seed's unlabeled volumes join the training items
        # (validation and test keep true labels only); labelled cases are repeated to their share of the epoch
        self.pseudo = None if cfg.self_training is None else PseudoLabels(
            cfg.self_training, datalist=cfg.datalist, splits=cfg.splits, seed=cfg.seed, items=self.items,
            out_channels=int(cfg.out_channels), out_dir=cfg.out_dir, device=str(self.device),
        )  # fmt: skip
        train_items = self.items["training"] + (self.pseudo.items if self.pseudo is not None else [])
        self.sampling = training_sampling(cfg, train_items)
        self.recipe |= {"augment": cfg.augment, "sampling": self.sampling, "plan": self.plan}
        if self.pseudo is not None:
            self.recipe["self_training"] = self.pseudo.report
        self.model = model.to(self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
        if self.amp_dtype is not None and self.device.type != "cuda":
            log.warning("amp=%s ignored on %s (AMP runs on CUDA only)", cfg.amp, self.device)
            self.amp_dtype = None
        tf = dict(normalisation=cfg.normalisation, target_spacing=cfg.target_spacing, ct_window=cfg.ct_window)
        self.eval_tf = eval_transforms(cfg.task, roi_size=cfg.roi_size, native_label=True, **tf)
        train_tf = train_transforms(
            cfg.task, roi_size=cfg.roi_size, num_samples=cfg.num_samples, augment=cfg.augment,
            sampling=self.sampling, num_classes=int(cfg.out_channels), class_ratios=cfg.class_ratios, **tf
        )
        self.train_ds = make_dataset(train_items, train_tf, cfg.cache_rate, cfg.num_workers)
        self.train_view: Any = self.train_ds  # what an epoch iterates (labelled cases repeated with self-training)
        # bidirectional copy-paste of (true, pseudo) pairs in each batch (medssl.engines.finetune.mix); 0 = off
        self.copy_paste = float((cfg.self_training or {}).get("copy_paste", 0.0))
        if self.pseudo is not None:
            n_lab, n_ps = len(self.items["training"]), len(self.pseudo.items)
            repeats = labelled_repeats(n_lab, n_ps, cfg.self_training["labelled_share"])
            self.train_view = Subset(self.train_ds, [i for i in range(n_lab) for _ in range(repeats)]
                                     + list(range(n_lab, n_lab + n_ps)))
            self.recipe["self_training"] |= {"labelled": n_lab, "labelled_repeats": repeats,
                                             "copy_paste": self.copy_paste}
            log.info("self_training: %d labelled case(s) × %d + %d pseudo-labelled per epoch", n_lab, repeats, n_ps)
        self.val_ds = make_dataset(self.items["validation"], self.eval_tf, cfg.cache_rate, cfg.num_workers)
        if self.seg:
            self.loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
        else:
            weight = class_weights(self.items["training"], cfg.num_classes).to(self.device)
            self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        if cfg.freeze_encoder:
            freeze_encoder(self.model, cfg.network)
        self.steps_per_epoch, self.total_steps = run_length(len(self.train_view), cfg.batch_size, cfg.max_steps,
                                                            cfg.max_epochs)
        self.max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # the pretrained part's schedule (SSL init): frozen phase, warm-up, scaled lr; None from scratch
        self.ssl_plan = resolve_ssl_schedule(cfg.ssl_schedule, total_steps=self.total_steps, init_kind=cfg.init_kind)
        self.cfg = cfg = cfg.replace(ssl_schedule=self.ssl_plan or "none")
        self.recipe["ssl_schedule"] = self.ssl_plan
        self.family = (self.recipe["build"]["recipe"] or {}).get("name")  # SSL encoder family: pretrained decoder?
        groups, factor = param_groups(self.model, cfg, self.ssl_plan, self.family)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = WarmupCosineSchedule(
            self.optimizer, cfg.lr, cfg.min_lr, self.total_steps, cfg.warmup_steps, pretrained_factor=factor
        )
        self.warm = EncoderWarmup(cfg.encoder_warmup_steps) if cfg.encoder_warmup_steps else None
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None  # validated + tested
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.inferer = SlidingWindowInferer(
            cfg.roi_size, sw_batch_size=cfg.sw_batch_size, overlap=cfg.sw_overlap
        )
        if cfg.tta and cfg.task == "segmentation":
            self.inferer = FlipTTAInferer(self.inferer, trained_flip_axes(cfg.augment))
        self.evaluator = FinetuneEvaluator(
            cfg.task, cfg.out_channels, self.inferer, self.device, amp_dtype=self.amp_dtype,
            batch_size=4 * cfg.batch_size, num_workers=cfg.num_workers, native_grid=cfg.target_spacing is not None,
        )  # fmt: skip
        self.selection = Selection(cfg.task, cfg.early_stopping_patience)
        self.out = Path(cfg.out_dir)
        self.checkpointer = FinetuneCheckpointer(
            self.out, config=cfg, recipe=self.recipe, model=self.model, optimizer=self.optimizer,
            schedule=self.schedule, scaler=self.scaler, selection=self.selection, transfer=self.transfer,
            run_id=tracker.run_id if tracker else None, ema=self.ema,
        )  # fmt: skip
        self.epoch, self.step, self.nan_run = 0, 0, 0
        self.val_step = -1  # optimizer step of the last validation
        # wall seconds measured in this process (FinetuneResult.timing): what the dry run estimates
        self.clock = {"train_s": 0.0, "steps": 0.0, "validation_s": 0.0, "validations": 0.0}
        self.history: list[dict[str, float]] = []
        self.pretrained_frozen = False
        self._sync_pretrained_freeze()  # an SSL schedule's frozen phase starts now

    @property
    def config_hash(self) -> str:
        """``medssl.config_hash``: the sweep's tag, else the hash of this run's resolved config (with the
        sha256 of a local SSL encoder file; :mod:`medssl.engines.finetune.identity`)."""
        return run_config_hash(self.cfg)

    # -- one optimizer step (schedule → warm-up → forward → guard → backward/clip → step) ----------------
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _sync_pretrained_freeze(self) -> None:
        """Hold the pretrained part frozen (no gradients, modules in eval) exactly while ``step < freeze_steps``
        of the SSL schedule; released at the switch step (also after a resume, which restores ``step``)."""
        frozen = self.ssl_plan is not None and self.step < self.ssl_plan["freeze_steps"]
        if frozen != self.pretrained_frozen:
            from medssl.networks.finetune_opts import freeze_pretrained

            freeze_pretrained(self.model, self.cfg.network, self.family, freeze=frozen)
            self.pretrained_frozen = frozen
            log.info("step %d: pretrained part %s", self.step, "frozen" if frozen else "released")

    def train_step(self, batch: dict[str, Any]) -> float | None:
        """One optimizer step on ``batch`` (``image (B, C, D, H, W)``, ``label``); ``None`` if skipped."""
        self._sync_pretrained_freeze()
        self.schedule.apply()
        if self.warm is not None:
            self.warm.apply(self.optimizer, self.step)
        x = as_tensor(batch["image"]).to(self.device, non_blocking=True)
        y = as_tensor(batch["label"]).to(self.device, non_blocking=True)
        if self.copy_paste and "case_id" in batch:  # a function of (seed, step): resume mixes the same boxes
            g = mix_generator(self.cfg.seed, self.step)
            x, y = bidirectional_copy_paste(x, y, copy_paste_pairs(batch["case_id"], self.copy_paste, g), g)
        with self._autocast():
            out = self.model(x)
        loss = self.loss_fn(out.float(), y if self.seg else y.long().reshape(-1))
        value = float(loss.detach())
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            self.step, self.nan_run = self.step + 1, self.nan_run + 1
            log.warning(
                "step %d: non-finite loss (%s); step skipped (%d in a row)", self.step, value, self.nan_run
            )
            if self.nan_run >= self.cfg.max_nan_steps:
                raise MedsslError(
                    f"{self.nan_run} consecutive non-finite losses (step {self.step}); lower lr, "
                    "set grad_clip or use amp=bf16"
                )
            return None
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step, self.nan_run = self.step + 1, 0
        return value

    def train_epoch(self, epoch: int) -> float:
        """Train epoch ``epoch`` (0-based; stops at ``total_steps``); returns the mean loss of its steps."""
        self.model.train()  # a linear probe's encoder stays in eval mode (finetune_opts.freeze_encoder)
        seed_epoch(self.train_ds, self.cfg.seed, epoch)
        losses = []
        tick = time.perf_counter()  # a step's time runs from fetching its batch to the end of the optimizer step
        for batch in epoch_loader(
            self.train_view, self.cfg.batch_size, self.cfg.seed, epoch, self.cfg.num_workers
        ):
            if self.step >= self.total_steps or self.selection.stopped:
                break
            if self.preemption is not None and self.preemption.requested:  # resumes at this epoch's start
                raise Preempted(self.preemption.signum, self.epoch, self.out / "checkpoints/last.pt", "epoch")
            value = self.train_step(batch)
            if value is not None:
                losses.append(value)
            self.clock["train_s"] += time.perf_counter() - tick
            self.clock["steps"] += 1
            every = self.cfg.val_every_steps
            if every and self.step % every == 0 and self.step < self.total_steps:  # the last: in fit
                self._record({f"val_{k}": v for k, v in self._validate().items()})
                self.model.train()
            tick = time.perf_counter()
        return float(np.mean(losses)) if losses else math.nan

    # -- evaluation, selection and checkpoints (the held objects) -------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The network that is validated, selected and tested: the weight average with ``ema_decay``, else
        the trained model; the one definition of that choice (``best.pt`` is written from it). Read from
        :attr:`model` at each call, so a network assigned to ``model`` after construction is the one evaluated."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, dataset: Any) -> dict[str, float]:
        """Metrics of :attr:`eval_model` on ``dataset`` (:class:`FinetuneEvaluator`), unprefixed."""
        return self.evaluator.evaluate(self.eval_model, dataset)

    def validate(self) -> dict[str, float]:
        """Evaluate on validation; ``best.pt`` on improvement of the selection metric; early stopping."""
        vals = self.evaluate(self.val_ds)
        if self.selection.update(vals, self.epoch):
            self.checkpointer.save_best(self.epoch, vals, self.eval_model)
        return vals

    def _validate(self) -> dict[str, float]:
        self.val_step = self.step
        t0 = time.perf_counter()
        vals = self.validate()
        self.clock["validation_s"] += time.perf_counter() - t0
        self.clock["validations"] += 1
        return vals

    def state_dict(self) -> dict[str, Any]:
        """The ``last.pt`` dict (:meth:`FinetuneCheckpointer.state_dict`)."""
        return self.checkpointer.state_dict(epoch=self.epoch, step=self.step, history=self.history)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every state of a ``last.pt`` dict (:meth:`FinetuneCheckpointer.load`).

        Raises:
            ConfigMismatchError: the checkpoint is of another task/network/init/fraction/seed/roi.
        """
        self.epoch, self.step, self.history = self.checkpointer.load(state, total_steps=self.total_steps)

    def _record(self, logs: dict[str, float]) -> None:
        """History + MLflow (x axis: the optimizer step with ``val_every_steps``, else the epoch)."""
        self.history.append({"epoch": float(self.epoch), "step": float(self.step), **logs})
        log.info("epoch %d, step %d: %s", self.epoch, self.step, fmt_metrics(logs))
        self._log(logs, self.step if self.cfg.val_every_steps else self.epoch)

    def _log(self, metrics: dict[str, float], x: int) -> None:
        """Send to MLflow what an earlier attempt of the run has not logged at ``x`` (a resume redoes steps)."""
        metrics = self.ledger.unlogged(metrics, x) if self.ledger is not None else metrics
        if self.tracker and metrics:
            self.tracker.log_metrics(metrics, x)

    # -- the run --------------------------------------------------------------------------------------
    def fit(self, *, fresh: bool = True, progress: bool = True) -> FinetuneResult:
        """Train to ``max_epochs`` / ``max_steps`` or early stop, then test the best-on-validation weights."""
        cfg, tr = self.cfg, self.tracker
        self.out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(self.out / "config.yaml")
        if self.plan is not None:
            (self.out / "plan.json").write_text(json.dumps(self.plan, indent=1))
        if self.transfer is not None:
            (self.out / "transfer_report.json").write_text(json.dumps(self.transfer, indent=1))
        if tr:
            log_run_start(tr, cfg, fresh=fresh, items=self.items, plan=self.plan, transfer=self.transfer,
                          config_hash=self.config_hash, sampling=self.sampling, out_dir=self.out)
        prev_det = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        try:
            with ProgressBar(progress, self.max_epochs, self.epoch, label="finetune") as bar:
                while self.epoch < self.max_epochs and self.step < self.total_steps and not self.selection.stopped:
                    loss = self.train_epoch(self.epoch)
                    self.epoch += 1
                    logs = {"train_loss": loss, "lr": self.schedule.value(max(self.step - 1, 0))}
                    done = self.epoch >= self.max_epochs or self.step >= self.total_steps
                    due = not cfg.val_every_steps and self.epoch % cfg.val_every == 0
                    if (due or done) and self.val_step != self.step and not self.selection.stopped:
                        logs |= {f"val_{k}": v for k, v in self._validate().items()}
                    self._record(logs)
                    if self.tracker:  # what a resume from this checkpoint will not redo must not be lost
                        self.tracker.persist()
                    self.checkpointer.save_last(epoch=self.epoch, step=self.step, history=self.history)
                    bar(self.epoch, loss)
            if self.selection.best is None:  # resumed a run that never validated
                self.validate()
            return self._finish()
        finally:
            torch.use_deterministic_algorithms(prev_det)

    def _finish(self) -> FinetuneResult:
        best_path, sel = self.checkpointer.best_path, self.selection
        best = ck.load_checkpoint(best_path, map_location=self.device)
        self.eval_model.load_state_dict(best["model"])
        test_ds = make_dataset(self.items["test"], self.eval_tf, self.cfg.cache_rate, self.cfg.num_workers)
        test = self.evaluate(test_ds)
        res = FinetuneResult(
            out_dir=self.out,
            run_id=self.tracker.run_id if self.tracker else None,
            best_checkpoint=best_path,
            best_val=dict(sel.best["values"]),
            test_metrics=test,
            epochs_run=self.epoch,
            transfer=self.transfer,
            status="early_stopped" if sel.stopped else "finished",
            best_epoch=int(sel.best["epoch"]),
            timing=self.clock | {"s_per_step": self.clock["train_s"] / max(1.0, self.clock["steps"])},
        )
        (self.out / "results.json").write_text(json.dumps(asdict(res), indent=1, default=str))
        log.info("best validation (epoch %d): %s; test: %s", res.best_epoch, fmt_metrics(res.best_val), fmt_metrics(test))
        if self.tracker:
            self._log({f"test_{k}": v for k, v in test.items()} | {"best_epoch": float(sel.best["epoch"])}, self.epoch)
            # wall times as tags, not metrics: a resumed run's metric history equals the uninterrupted one's
            timing = {"medssl.s_per_step": f"{res.timing['s_per_step']:.4f}",
                      "medssl.train_minutes": f"{res.timing['train_s'] / 60:.2f}"} if self.clock["steps"] else {}
            self.tracker.set_tags({"medssl.status": res.status} | timing)
            self.tracker.log_artifact(best_path, "checkpoints")
            self.tracker.log_artifact(self.out / "results.json")
        return res


def run_finetune(
    config: FinetuneConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    preemption: PreemptionHandler | bool = True,
) -> FinetuneResult:
    """Finetune one (fraction, init, seed); the library entry point behind ``medssl finetune``.

    Args:
        config: the run config.
        resume: ``"auto"`` (continue from ``out_dir/checkpoints/last.pt`` when it exists, else start, in the
            MLflow run the folder records for this config if any: :func:`~medssl.engines.finetune.ledger.open_run`),
            a ``last.pt`` path, or ``None`` (start fresh). A resumed run sends no metric step already logged.
        progress: show a rich progress bar.
        preemption: trap SIGUSR1/SIGTERM (``True``: a fresh handler, or the caller's, or ``False``). A signal
            stops training before the next step and raises ``Preempted`` (CLI exit 75) without a new
            checkpoint: finetuning resumes at epoch granularity, from the last epoch-end ``last.pt``, so the
            steps since then are redone and the result equals an uninterrupted run's.

    Raises:
        MedsslError: bad splits / fraction (e.g. a class without training cases), an SSL checkpoint that does
            not fit (``TransferError`` with ``.report``; ``transfer_report.json`` is written and logged),
            contradicting preprocessing (``ConfigMismatchError``), repeated non-finite losses. The MLflow run
            is then marked FAILED with the error as tag ``medssl.error``.
    """
    last = Path(config.out_dir) / "checkpoints" / "last.pt"
    path = (last if last.exists() else None) if resume == "auto" else resume
    state = ck.load_checkpoint(path) if path is not None else None
    tracker, ledger = open_run(config, state, resume=resume)  # the checkpoint's run, or the folder's (ledger)
    try:  # Finetuner seeds itself (after the MLflow set-up above: the weights never depend on tracking)
        ft = Finetuner(config, tracker=tracker, ledger=ledger)
        if state is not None:
            ft.load_state_dict(state)
        ft.preemption = PreemptionHandler() if preemption is True else (preemption or None)
        with ft.preemption or nullcontext():
            result = ft.fit(fresh=state is None, progress=progress)
    except BaseException as e:
        close_run(tracker, e, out_dir=config.out_dir)  # KILLED (preempted, Ctrl-C) or FAILED, the error as a tag
        raise
    close_run(tracker)
    return result
