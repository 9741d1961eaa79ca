"""What a finetuning run (:mod:`medssl.engines.finetune.engine`) reports: the :class:`FinetuneResult`, its MLflow
run (:func:`open_tracker` with the standard finetuning tags, :func:`log_run_start`: params, tags and artifacts
at the start) and the log formatting of metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.engines.finetune.config import FinetuneConfig

__all__ = ["FinetuneResult", "fmt_metrics", "open_tracker", "log_run_start", "PLAN_PARAMS"]

#: plan entries logged as MLflow params ``plan.<key>`` (the whole plan is the artifact ``plan.json``)
PLAN_PARAMS = ("target_spacing", "spacing_source", "median_shape", "patch_size", "strides", "batch_size",
               "num_classes")


@dataclass
class FinetuneResult:
    """Outcome of :func:`~medssl.engines.finetune.engine.run_finetune`. ``status`` is ``"finished"`` or
    ``"early_stopped"``; ``best_val`` and ``test_metrics`` use metric names without the ``val_`` / ``test_``
    prefix; ``timing`` the measured seconds (MLflow tags ``medssl.s_per_step``, ``medssl.train_minutes``)."""

    out_dir: Path
    run_id: str | None = None
    best_checkpoint: Path | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    transfer: dict[str, Any] | None = None
    status: str = "finished"
    best_epoch: int | None = None
    #: wall seconds of this process's part of the run (a resumed run: since the resume): ``train_s`` (optimizer
    #: steps incl. fetching their batches), ``steps``, ``s_per_step``, ``validation_s``, ``validations``; what
    #: ``medssl finetune --dry-run`` estimates, measured
    timing: dict[str, float] = field(default_factory=dict)


def fmt_metrics(values: dict[str, float]) -> str:
    """``{"dice_mean": 0.81234}`` → ``"dice_mean 0.8123"`` (4 significant digits, comma-joined)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def open_tracker(cfg: FinetuneConfig, run_id: str | None) -> Any:
    """The run's :class:`~medssl.tracking.mlflow_tracker.MlflowTracker` (``run_id``: reattach on resume), tagged
    ``medssl.study`` / ``fraction`` / ``init`` / ``seed`` / ``task`` / ``network`` (+ ``cfg.tags``), with its
    outage spool in ``out_dir``."""
    from medssl.data.splits import fraction_key
    from medssl.tracking.mlflow_tracker import MlflowTracker, standard_tags

    tags = {
        **standard_tags(
            "finetune",
            study=cfg.study,
            fraction=fraction_key(cfg.fraction),
            init=cfg.init_kind,
            seed=cfg.seed,
        ),
        "medssl.task": cfg.task,
        "medssl.network": cfg.network,
        **cfg.tags,
    }
    if cfg.ssl_source:
        tags["medssl.ssl_source"] = cfg.ssl_source
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return MlflowTracker(
        cfg.experiment,
        run_name=cfg.run_name or out.name,
        tracking_uri=cfg.tracking_uri,
        tags=tags,
        run_id=run_id,
        parent_run_id=cfg.parent_run_id,
        spool_path=out / "mlflow_spool.jsonl",
    )


def log_run_start(
    tracker: Any,
    cfg: FinetuneConfig,
    *,
    fresh: bool,
    items: dict[str, list[dict[str, Any]]],
    plan: dict[str, Any] | None,
    transfer: dict[str, Any] | None,
    config_hash: str,
    sampling: str,
    out_dir: Path,
) -> None:
    """Params (a fresh run only: the flat config, ``data.n_training``, ``config_hash``, ``sampling_used``,
    ``plan.*``, ``transfer.share``), tags (``medssl.config_hash``, ``medssl.machine``; ``medssl.data_hash`` unless a
    sweep set it) and
    the artifacts ``config.yaml`` / ``plan.json`` / ``transfer_report.json`` already written in ``out_dir``."""
    if fresh:
        from medssl.config import flatten_dict

        params = flatten_dict(cfg.to_dict()) | {"data.n_training": len(items["training"])}
        params["config_hash"] = config_hash
        params["sampling_used"] = sampling
        if plan is not None:
            params |= {f"plan.{k}": plan[k] for k in PLAN_PARAMS}
        if transfer is not None:
            params["transfer.share"] = round(transfer["share"], 6)
        tracker.log_params(params)
    from medssl.engines.finetune.data import items_hash  # torch & MONAI only when a run logs
    from medssl.engines.runtime.checkpoint import machine_tag

    tags = {"medssl.config_hash": config_hash, "medssl.machine": machine_tag()}  # the latest (re)start's machine
    if "medssl.data_hash" not in cfg.tags:  # a sweep sets its own data hash
        tags["medssl.data_hash"] = items_hash([it for role in items.values() for it in role])
    tracker.set_tags(tags)
    tracker.log_artifact(out_dir / "config.yaml")
    if plan is not None:
        tracker.log_artifact(out_dir / "plan.json")
    if transfer is not None:
        tracker.log_artifact(out_dir / "transfer_report.json")
