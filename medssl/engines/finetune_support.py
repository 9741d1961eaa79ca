"""Helpers of a finetuning run (:mod:`medssl.engines.finetune`): the `FinetuneResult`, log formatting and the
MLflow tracker with the standard finetuning tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.engines.finetune_config import FinetuneConfig

__all__ = ["FinetuneResult"]


@dataclass
class FinetuneResult:
    """Outcome of :func:`~medssl.engines.finetune.run_finetune`. ``status`` is ``"finished"`` or
    ``"early_stopped"``; ``best_val`` and ``test_metrics`` use metric names without the ``val_`` / ``test_``
    prefix."""

    out_dir: Path
    run_id: str | None = None
    best_checkpoint: Path | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    transfer: dict[str, Any] | None = None
    status: str = "finished"
    best_epoch: int | None = None


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def _open_tracker(cfg: FinetuneConfig, run_id: str | None) -> Any:
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
