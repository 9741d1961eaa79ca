"""Checkpoints, exact resume and run outputs of :class:`medssl.engines.pretrain.Pretrainer`.

`_PretrainerState` is a mixin of ``Pretrainer`` (it uses the attributes set by ``Pretrainer.__init__``:
``cfg``, ``out``, ``method``, ``optimizer``, ``schedule``, ``scaler``, ``batcher``, ``augment``, ``dist``,
``tracker``…): the checkpoint dict and its atomic files, ``resume``, the encoder export and MLflow
artifacts at the end of a run, and the augmentation preview. The training step and loop stay in
:mod:`medssl.engines.pretrain`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from medssl.config import flatten_dict
from medssl.engines import checkpoint as ck
from medssl.engines import distributed as dd
from medssl.engines.components import make_tracker
from medssl.engines.data import CropBatcher, pool_fingerprint
from medssl.errors import MedsslError

__all__: list[str] = []

log = logging.getLogger(__name__)


class _PretrainerState:
    """Checkpoint / resume / output methods of ``Pretrainer`` (a mixin; see the module docstring)."""

    # -- checkpoints ----------------------------------------------------------------------------------
    def _last_path(self) -> Path | None:
        p = self.out / "checkpoints" / "last.pt"
        return p if p.exists() else None

    def _rank_state(self) -> dict[str, Any]:
        return {
            "rng": ck.capture_rng(),
            "augment": ck.component_state(self.augment),
            "data": self.batcher.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict; the top-level RNG/augment/data are rank 0's, ``"ranks"`` (DDP only)
        holds every rank's. Under DDP every rank must call it (one all-gather)."""
        ranks = dd.all_gather_objects(self._rank_state()) if self.dist.enabled else None
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
            **({"ranks": ranks, "world_size": self.dist.world_size} if ranks else {}),
        }

    def save_checkpoint(self) -> Path:
        """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically (rank 0); prune old periodic ones.
        Under DDP every rank calls it and leaves once the files exist."""
        state, folder = self.state_dict(), self.out / "checkpoints"
        path = folder / f"step_{self.step:07d}.pt"
        if self.dist.is_main:
            ck.atomic_save(state, path)
            ck.atomic_save(state, folder / "last.pt")
        self.checkpoints.append(path)
        while len(self.checkpoints) > max(1, self.cfg.keep_checkpoints):
            old = self.checkpoints.pop(0)
            if self.dist.is_main:
                old.unlink(missing_ok=True)
        dd.barrier()
        if self.dist.is_main:
            log.info("checkpoint %s", path)
        return path

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, schedule, scaler, augmentation, RNG and data position from ``path``.

        Raises:
            ConfigMismatchError: the checkpoint is of another method/encoder/input size (both named).
        """
        state = ck.load_checkpoint(path, map_location="cpu")  # RNG states must stay on the CPU
        ck.check_recipe(state["recipe"], self.recipe)
        _check_same_pool(state["recipe"].get("pool"), self.recipe["pool"], path)
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
        own = dd.select_rank_state(state, self.dist)
        if own is not None:
            ck.load_component_state(self.augment, own.get("augment"))
            self.batcher.load_state_dict(own["data"])
            ck.restore_rng(own["rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return state

    # -- run outputs -----------------------------------------------------------------------------------
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
        r.final_loss = r.loss_history[-1][1] if r.loss_history else None
        skipped = dd.all_gather_objects(self.batcher.skipped) if self.dist.enabled else [self.batcher.skipped]
        r.skipped_volumes = {_image_name(self.pool[i]["image"]): why for s in skipped for i, why in s.items()}
        if not self.dist.is_main:
            r.encoder_path, r.encoder_json = self.out / "encoder.pt", self.out / "encoder.json"
            dd.barrier()  # rank 0 writes the encoder and closes MLflow
            return
        r.encoder_path, r.encoder_json = ck.save_encoder(self.out, self.encoder, self.recipe)
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
        dd.barrier()

    def _start_tracking(self, run_id: str | None, fresh: bool) -> None:
        preview = self._preview() if fresh and self.cfg.preview else None
        if not self.cfg.experiment:
            return
        self.tracker = make_tracker(self.cfg, pool_fingerprint(self.pool), self.out, run_id)
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
            b = self.batcher  # same shard: under data_shard="pool" this rank's dataset holds only its part
            side = CropBatcher(self.dataset, self.cfg.source_size, self.cfg.seed + 1, b.rank, b.world_size, b.shard)
            with torch.no_grad():
                batch = self.augment([v.to(self.device) for v in side.next_batch(4)])
            return save_augment_preview(batch, self.out / "augment_preview.png")
        except Exception as e:  # noqa: BLE001 - a preview must never stop a run
            log.warning("augmentation preview failed: %s", e)
            return None
        finally:
            ck.restore_rng(rng)
            ck.load_component_state(self.augment, aug)


def _image_name(image: str | list[str]) -> str:
    """A pool item's image as one string (channel files joined by `` + ``)."""
    return " + ".join(image) if isinstance(image, list) else image


def _check_same_pool(saved: dict[str, Any] | None, current: dict[str, Any], path: str | Path) -> None:
    """A resume must continue on the pool the checkpoint was trained on: the recipe's case ids would
    otherwise understate what the encoder saw (and the data position would not be exact).

    Raises:
        MedsslError: the pools differ, naming how many cases were added / removed.
    """
    if saved is None:
        log.warning("%s records no pretraining pool (older checkpoint): the recipe will list today's pool", path)
        return
    old, new = set(saved.get("case_ids", [])), set(current["case_ids"])
    if old != new:
        raise MedsslError(
            f"{path} was pretrained on another pool ({len(new - old)} cases added, {len(old - new)} removed "
            "since, e.g. seeds added to splits.json): resuming would hide what the encoder saw; start a new run"
        )
