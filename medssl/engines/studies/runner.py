"""The state machine of one :func:`medssl.engines.studies.sweep.run_sweep` call: the MLflow parent run (reattached
or created), pretraining once, one finetuning child per (fraction, init, seed), and the MLflow bookkeeping
of children (skip FINISHED, record FAILED with ``medssl.error``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medssl.data.splits import fraction_key
from medssl.engines.finetune.identity import config_hash, config_identity, file_sha256, split_data_hash
from medssl.engines.runtime.preemption import Preempted
from medssl.engines.studies.identity import (
    Conflict,
    pretrain_identity,
    refuse_conflicts,
    resolve_preprocessing,
)
from medssl.engines.studies.pipeline import Pipeline, base_init, finetune_dict, teacher_init
from medssl.engines.studies.results import (
    _MARKER,
    ChildOutcome,
    SweepResult,
    _child_key,
    _data_hash,
    _write_marker,
    read_marker,
)
from medssl.errors import MedsslError
from medssl.tracking.compare import child_runs, find_study_runs
from medssl.tracking.mlflow_tracker import MlflowTracker, git_sha, make_client, standard_tags

__all__ = ["SweepRun"]

log = logging.getLogger(__name__)


class SweepRun:
    """State of one :func:`~medssl.engines.studies.sweep.run_sweep` call: the parent run, its folder and the outcomes
    so far."""

    def __init__(
        self,
        pl: Pipeline,
        datalist: Path,
        splits: Path,
        finetune_fn: Callable[..., Any],
        progress: bool,
        new: bool,
        parent_run_id: str | None = None,
        only: str | None = None,
    ) -> None:
        self.pl, self.datalist, self.splits, self.finetune_fn, self.progress = (
            pl,
            datalist,
            splits,
            finetune_fn,
            progress,
        )
        self.data_hash, self.sha, self.uri = _data_hash(datalist, splits), git_sha(), pl.tracking_uri or None
        self.client = make_client(self.uri)
        # a SLURM array task (medssl.cluster.sweep_jobs): run only "pretrain" or child index `only`, attached
        # to the parent run the submitter made
        self.parent_run_id, self.only = parent_run_id, only
        self.parent, self.sweep_dir = self._open_parent(new)
        self.result = SweepResult(pl.study, self.parent.run_id, self.sweep_dir, self.data_hash)
        self.preprocessing: dict[str, Any] = {}
        self.encoder_sha: str | None = None
        self.pretrain_identity: dict[str, Any] | None = None
        self.existing: dict[str, tuple[str, str, str | None, str | None]] = {}  # sweep key → its run (run())
        self.planned: dict[str, str] = {}  # sweep key → config hash of the children planned so far (_plan)
        self.common = {
            "experiment": pl.experiment,
            "tracking_uri": self.uri,
            "parent_run_id": self.parent.run_id,
        }

    def _open_parent(self, new: bool) -> tuple[MlflowTracker, Path]:
        """Reattach to the study's newest parent run (unless ``new``) or create one; its sweep folder."""
        pl = self.pl
        exp = self.client.get_experiment_by_name(pl.experiment)
        previous = find_study_runs(self.client, pl.study, [exp.experiment_id]) if exp is not None else []
        if self.parent_run_id:
            previous, new = [self.client.get_run(self.parent_run_id)], False
        tags = {
            **standard_tags("sweep", study=pl.study, data_hash=self.data_hash, sha=self.sha),
            "medssl.metric": pl.metric,
        }
        kw = {"tracking_uri": self.uri, "client": self.client, "tags": tags}
        if previous and not new:
            run = previous[0]
            if run.data.tags.get("medssl.data_hash", self.data_hash) != self.data_hash:
                log.warning("study %s: datalist/splits changed since its parent run was made", pl.study)
            sweep_dir = Path(run.data.tags.get("medssl.sweep_dir") or pl.study_root / "sweep")
            log.info("resuming study %s (parent run %s, %s)", pl.study, run.info.run_id, sweep_dir)
            return MlflowTracker(
                pl.experiment, run_id=run.info.run_id, spool_path=sweep_dir / "mlflow_spool.jsonl", **kw
            ), sweep_dir
        tracker = MlflowTracker(pl.experiment, run_name=pl.study, **kw)
        sweep_dir = pl.study_root / ("sweep" if not previous else f"sweep-{tracker.run_id[:8]}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tracker.spool_path = sweep_dir / "mlflow_spool.jsonl"
        tracker.set_tags({"medssl.sweep_dir": str(sweep_dir.resolve())})
        tracker.log_params(
            {
                "fractions": pl.fractions,
                "inits": pl.inits,
                "seeds": pl.seeds,
                "metric": pl.metric,
                "data": json.dumps(pl.data, sort_keys=True),
            }
        )
        log.info("study %s: new parent run %s in %s", pl.study, tracker.run_id, sweep_dir)
        return tracker, sweep_dir

    def run(self, pretrain_fn: Callable[..., Any]) -> None:
        pl, r = self.pl, self.result
        try:
            existing = self._existing_children()
        except Exception as e:  # noqa: BLE001 - MLflow hiccup: the local markers still tell finished children
            log.warning("cannot list child runs of %s (%s); using local markers only", pl.study, e)
            existing = {}
        self.existing, pretrain_error = existing, None
        self._check_pretrain()  # a changed pretraining config is refused, never silently reused
        if "ssl" in pl.inits:
            if self.only not in (None, "pretrain") and not self._pretrain_finished():
                raise MedsslError(f"study {pl.study}: child {self.only} needs the finished pretraining "
                                  f"({self.sweep_dir / 'pretrain'}); submit it first (medssl sweep --slurm)")
            try:
                r.encoder_path, r.pretrain_run_id = self._pretrain(pretrain_fn)
            except Preempted:
                raise
            except Exception as e:  # noqa: BLE001 - scratch children can still run
                if (pl.pretrain or {}).get("checkpoint") or self.only == "pretrain":
                    raise
                pretrain_error = f"pretraining failed: {type(e).__name__}: {e}"
                log.error("%s; ssl children are marked FAILED, scratch children go on", pretrain_error)
        if r.encoder_path is not None:
            try:  # both arms get the SSL recipe's preprocessing (sweep_identity)
                self.preprocessing = resolve_preprocessing(r.encoder_path, pl.finetune)
            except MedsslError as e:
                if (pl.pretrain or {}).get("checkpoint"):
                    raise
                pretrain_error, r.encoder_path = f"pretraining wrote an unusable encoder: {e}", None
                log.error("%s; ssl children are marked FAILED, scratch children go on", pretrain_error)
        if self.only == "pretrain":
            return
        self.encoder_sha = file_sha256(r.encoder_path) if r.encoder_path is not None else None
        self.parent.set_tags({"medssl.ssl_checkpoint": str(r.encoder_path or "")})
        todo = pl.children()  # teachers first, then self-training students
        plans = [self._plan(f, i, s) for f, i, s in todo]
        self._check_reuse(plans, existing)  # refuses before any child runs
        if self.only is not None and not 0 <= int(self.only) < len(plans):
            raise MedsslError(f"study {pl.study} has children 0..{len(plans) - 1}, not {self.only}")
        for n, (c, cfg, identity) in enumerate(plans, start=1):
            if self.only is not None and n - 1 != int(self.only):
                continue
            marker = read_marker(c.out_dir)
            if existing.get(c.key, ("",))[0] == "FINISHED" or marker.get("status") == "FINISHED":
                log.info("[%d/%d] %s finished earlier; skipped", n, len(todo), c.key)
                c.status = "SKIPPED"
                c.run_id = marker.get("run_id") or (existing.get(c.key) or ("", None))[1]
                c.metrics = marker.get("metrics", {})
                r.children.append(c)
                continue
            log.info("[%d/%d] %s", n, len(todo), c.key)
            r.children.append(self._child(c, cfg, identity, pretrain_error))
            if self.only is not None:  # array task: the parent's counters and sweep.json are the sweep's
                return
            self.parent.log_metrics(
                {
                    "children_done": float(sum(c.status != "FAILED" for c in r.children)),
                    "children_failed": float(len(r.failed)),
                },
                step=n,
            )
        self.parent.set_tags({"medssl.children_failed": str(len(r.failed))})
        rows = [dataclasses.asdict(c) | {"out_dir": str(c.out_dir)} for c in r.children]
        (self.sweep_dir / "sweep.json").write_text(
            json.dumps({"study": r.study, "parent_run_id": r.parent_run_id, "children": rows}, indent=1)
        )

    def _check_pretrain(self) -> None:
        """Record the pretraining's config identity; refuse when the sweep's pretraining ran with another."""
        spec = dict(self.pl.pretrain or {})
        if "ssl" not in self.pl.inits or spec.get("checkpoint"):
            return
        self.pretrain_identity = ident = pretrain_identity({"datalist": str(self.datalist), **spec})
        marker = read_marker(self.sweep_dir / "pretrain")
        old = marker.get("config")
        if old is not None and old != ident:
            what = "finished" if marker.get("status") == "FINISHED" else "interrupted"
            refuse_conflicts(
                self.pl.study,
                [Conflict("pretrain", what, "config", config_hash(old), config_hash(ident), old, ident)],
            )

    def _existing_children(self) -> dict[str, tuple[str, str, str | None, str | None]]:
        """sweep key → (status, run id, config hash, data hash) of the parent's child runs (a FINISHED one
        wins, else the newest)."""
        out: dict[str, tuple[str, str, str | None, str | None]] = {}
        for run in child_runs(self.client, self.client.get_run(self.parent.run_id)):
            key, tags = run.data.tags.get("medssl.sweep_key"), run.data.tags
            upgrade = key in out and run.info.status == "FINISHED" and out[key][0] != "FINISHED"
            if key and (key not in out or upgrade):
                out[key] = (run.info.status, run.info.run_id, tags.get("medssl.config_hash"),
                            tags.get("medssl.data_hash"))
        return out

    def _plan(self, fraction: float, init: str, seed: int) -> tuple[ChildOutcome, dict[str, Any], dict]:
        """The child's outcome record, its effective finetune config and its config identity (hashed).

        ``init`` is an arm: ``"scratch"``, ``"ssl"`` or a self-training student (``"ssl+st"``, second round
        ``"ssl+st2"``), which starts as its base init (``ssl``) and learns from the pseudo-labels of its teacher arm's
        child (``ssl``, resp. ``ssl+st``) of the same fraction and seed."""
        pl, key = self.pl, _child_key(fraction, init, seed)
        c = ChildOutcome(key, fraction, init, seed, self.sweep_dir / key, "FAILED")
        base = finetune_dict(pl, fraction, init)
        teacher = teacher_init(init)
        if teacher is not None:  # the teacher's best.pt (a path inside the sweep: the same before and after it runs)
            best = self.sweep_dir / _child_key(fraction, teacher, seed) / "checkpoints" / "best.pt"
            base["self_training"] = {**pl.student_options(), "teacher": str(best)}
        start = base_init(init)
        enc = self.result.encoder_path
        cfg = {
            **base,
            **self.preprocessing,
            **self.common,
            "datalist": str(self.datalist),
            "splits": str(self.splits),
            "fraction": fraction,
            "seed": seed,
            "study": pl.study,
            "out_dir": str(c.out_dir),
            "run_name": f"{pl.study}/{key}",
            "init": "scratch" if start == "scratch" else f"ssl:{enc if enc is not None else 'unavailable'}",
        }
        ident_cfg = cfg
        if teacher is not None:  # the teacher as a role + its config, not its per-seed path: one hash per cell
            teacher_hash = self.planned[_child_key(fraction, teacher, seed)]  # planned first (Pipeline.children)
            ident_cfg = {**cfg, "self_training": {**cfg["self_training"], "teacher": f"sweep:{teacher}:{teacher_hash}"}}
        identity = config_identity(ident_cfg, encoder_sha256=self.encoder_sha if start == "ssl" else None)
        c.config_hash = self.planned[key] = config_hash(identity)
        c.data_hash = split_data_hash(self.datalist, self.splits, seed=seed, fraction=fraction)
        cfg["tags"] = {**base.get("tags", {}), **self._tags(c)}
        return c, cfg, identity

    def _check_reuse(self, plans: list[tuple[ChildOutcome, dict[str, Any], dict]],
                     existing: dict[str, tuple[str, str, str | None, str | None]]) -> None:
        """Refuse (MedsslError, nothing run) when a finished / failed / interrupted child was made with another
        config or data than it would get now (:mod:`medssl.engines.studies.identity`)."""
        conflicts = []
        for c, _, identity in plans:
            marker = read_marker(c.out_dir)
            status, _, run_cfg, run_data = existing.get(c.key, ("", "", None, None))
            state = marker.get("status") or status
            if not state or (not marker and state == "FAILED"):
                continue  # never started (e.g. its pretraining failed): retried with the current config
            what = {"FINISHED": "finished", "FAILED": "failed"}.get(state, "interrupted")
            old_cfg, old_data = marker.get("config_hash") or run_cfg, marker.get("data_hash") or run_data
            if old_cfg is None and old_data is None:
                if state == "FINISHED":
                    log.warning("child %s records no config hash (made by an older medssl): reused", c.key)
                continue
            if old_cfg is not None and old_cfg != c.config_hash:
                old = marker.get("config") if marker.get("config_hash") == old_cfg else None
                conflicts.append(Conflict(c.key, what, "config", old_cfg, c.config_hash, old, identity))
            elif old_data is not None and old_data != c.data_hash:
                conflicts.append(Conflict(c.key, what, "data", old_data, c.data_hash))
        refuse_conflicts(self.pl.study, conflicts)

    def _tags(self, c: ChildOutcome) -> dict[str, str]:
        tags = {
            **standard_tags(
                "finetune",
                study=self.pl.study,
                init=c.init,
                seed=c.seed,
                data_hash=c.data_hash or self.data_hash,
                sha=self.sha,
            ),
            "medssl.fraction": fraction_key(c.fraction),
            "medssl.sweep_key": c.key,
        }
        if c.config_hash:
            tags["medssl.config_hash"] = c.config_hash
        return tags

    def _child(self, c: ChildOutcome, cfg: dict[str, Any], identity: dict[str, Any],
               pretrain_error: str | None) -> ChildOutcome:
        """Run (or resume) one child; a failure is recorded on the outcome and in MLflow, never raised."""
        from medssl.engines.finetune.config import FinetuneConfig
        from medssl.engines.finetune.ledger import adopt_run

        try:
            teacher = teacher_init(c.init)
            if base_init(c.init) == "ssl" and self.result.encoder_path is None:
                raise MedsslError(pretrain_error or "no SSL checkpoint")
            if teacher is not None:
                tkey = _child_key(c.fraction, teacher, c.seed)
                state = read_marker(self.sweep_dir / tkey).get("status")
                if state != "FINISHED":
                    raise MedsslError(f"self-training teacher {tkey} has not finished (status {state or 'not started'}); "
                                      "the student runs once it has (re-run the sweep)")
            c.status = "RUNNING"
            _write_marker(c, identity)  # what this child runs with, before anything of it exists
            c.status, config = "FAILED", FinetuneConfig.from_dict(cfg)
            prev, run_id = (self.existing.get(c.key) or ("", None))[:2]
            if prev in ("RUNNING", "KILLED"):  # interrupted before its folder named its run: continue that run
                adopt_run(c.out_dir, run_id, config)
            res = self.finetune_fn(config, resume="auto", progress=self.progress)
            c.run_id = getattr(res, "run_id", None)
            c.metrics = {k: float(v) for k, v in (getattr(res, "test_metrics", None) or {}).items()}
            status = str(getattr(res, "status", None) or "finished")
            if status.upper() in ("FAILED", "KILLED"):  # run_finetune says "finished" / "early_stopped"
                raise MedsslError(f"finetuning ended with status {status}")
            c.status = "FINISHED"
            _write_marker(c, identity)
        except Preempted:  # checkpointed: the requeued job resumes it (neither FAILED nor a marker change)
            raise
        except Exception as e:  # noqa: BLE001 - one failing child never stops the sweep
            c.status = "FAILED"
            c.error = f"{type(e).__name__}: {e}"[:1000]
            log.error("child %s failed: %s", c.key, c.error)
            c.run_id = self._mark_failed(c)
            if (c.out_dir / _MARKER).exists():
                _write_marker(c)
        return c

    def _mark_failed(self, c: ChildOutcome) -> str | None:
        """Mark the child's run (found by sweep key) FAILED with ``medssl.error``; make one if none exists."""
        client = self.client
        try:
            runs = [
                x
                for x in child_runs(client, client.get_run(self.parent.run_id))
                if x.data.tags.get("medssl.sweep_key") == c.key
            ]
            if runs:
                run_id = runs[0].info.run_id
                client.set_tag(run_id, "medssl.error", c.error)
                try:
                    client.log_param(run_id, "medssl.error", c.error)
                except Exception:  # noqa: BLE001 - params are immutable: an earlier attempt's error stays
                    log.debug("param medssl.error already set on %s", run_id)
                if runs[0].info.status != "FAILED":
                    client.set_terminated(run_id, status="FAILED")
                return run_id
            tr = MlflowTracker(
                self.pl.experiment,
                run_name=f"{self.pl.study}/{c.key}",
                tracking_uri=self.uri,
                client=client,
                tags={**self._tags(c), "medssl.error": c.error},
                parent_run_id=self.parent.run_id,
                spool_path=c.out_dir / "mlflow_spool.jsonl",
                close_timeout_s=10,
            )
            tr.log_params({"medssl.error": c.error, "fraction": c.fraction, "seed": c.seed, "init": c.init})
            tr.close("FAILED")
            return tr.run_id
        except Exception as e:  # noqa: BLE001 - recording the failure must not stop the sweep either
            log.warning("could not record the failure of %s in MLflow: %s", c.key, e)
            return None

    def _pretrain_finished(self) -> bool:
        """A reused ``pretrain.checkpoint``, or this sweep's pretraining marked FINISHED with its encoder."""
        out = self.sweep_dir / "pretrain"
        reuse = bool((self.pl.pretrain or {}).get("checkpoint"))
        return reuse or ((out / "encoder.pt").exists() and read_marker(out).get("status") == "FINISHED")

    def _pretrain(self, pretrain_fn: Callable[..., Any]) -> tuple[Path, str | None]:
        """Reuse ``pretrain.checkpoint``, or pretrain once into ``<sweep>/pretrain`` (skipped if finished)."""
        from medssl.config import PretrainConfig

        spec = dict(self.pl.pretrain or {})
        if spec.get("checkpoint"):
            ckpt = Path(spec["checkpoint"])
            if not ckpt.exists():
                raise MedsslError(f"pretrain.checkpoint {ckpt} does not exist")
            return ckpt.resolve(), None
        out = self.sweep_dir / "pretrain"
        marker = read_marker(out)
        if (out / "encoder.pt").exists() and marker.get("status") == "FINISHED":
            log.info("pretraining finished earlier: %s", out / "encoder.pt")
            return (out / "encoder.pt").resolve(), marker.get("run_id")
        tags = {
            **spec.get("tags", {}),
            "medssl.study": self.pl.study,
            "medssl.sweep_key": "pretrain",
            "medssl.data_hash": self.data_hash,
        }
        cfg = PretrainConfig.from_dict(
            {
                "datalist": str(self.datalist),
                "splits": str(self.splits),
                **spec,
                **self.common,
                "out_dir": str(out),
                "run_name": f"{self.pl.study}/pretrain",
                "tags": tags,
            }
        )
        last = out / "checkpoints" / "last.pt"
        out.mkdir(parents=True, exist_ok=True)
        (out / _MARKER).write_text(json.dumps({"status": "RUNNING", "config": self.pretrain_identity}))
        res = pretrain_fn(cfg, resume=last if last.exists() else None, progress=self.progress)
        encoder = Path(getattr(res, "encoder_path", None) or out / "encoder.pt")
        if not encoder.exists():
            raise MedsslError(f"pretraining wrote no encoder at {encoder}")
        run_id = getattr(res, "run_id", None)
        (out / _MARKER).write_text(
            json.dumps({"status": "FINISHED", "run_id": run_id, "config": self.pretrain_identity})
        )
        return encoder.resolve(), run_id
