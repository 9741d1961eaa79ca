"""Load a finetuned model for inference: network in eval mode + the plain preprocessing recipe.

``source`` may be

- a finetune checkpoint file (``checkpoints/best.pt``: ``{"recipe", "config", "epoch", "model", "val"}``,
  written by :mod:`medssl.engines.finetune.engine`; ``last.pt`` works too),
- a finetune run folder (``<run>/checkpoints/best.pt`` inside, or ``best.pt`` directly in it),
- an MLflow URI: ``runs:/<run_id>`` (the run's ``checkpoints/best.pt`` artifact, logged by the finetune engine),
  ``runs:/<run_id>/<artifact path>``, ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (a registered
  model whose artifacts hold one finetune checkpoint), downloaded with ``mlflow.artifacts``.

The ``preprocessing`` dict (:func:`preprocessing_recipe`) is everything inference needs, derived from the
checkpoint's recipe and config (nothing re-typed)::

    {"task": "segmentation", "in_channels": 1, "out_channels": 3,
     "class_names": {"0": "background", "1": "anterior", "2": "posterior"},
     "axcodes": "RAS", "target_spacing": None, "normalisation": "robust", "ct_window": [-1000.0, 1000.0],
     "roi_size": [32, 32, 32], "sw_overlap": 0.25, "sw_batch_size": 4, "flip_axes": [0, 1, 2]}

It is the argument of :func:`medssl.transforms.preprocess.preprocess_transforms`.

Example::

    m = load_model("runs/ft/checkpoints/best.pt")
    x = preprocess_transforms(m.preprocessing)({"image": "case.nii.gz"})["image"]   # (C, X, Y, Z)
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medssl.engines.finetune.augment import trained_flip_axes
from medssl.errors import MedsslError

__all__ = ["DeployModel", "load_model", "load_finetune_checkpoint", "preprocessing_recipe", "resolve_source"]

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class DeployModel:
    """A finetuned network ready for inference.

    Attributes:
        network: the network, eval mode, weights loaded, on the requested device; input
            ``(B, in_channels, D, H, W)`` float32 → logits ``(B, out_channels, D, H, W)`` (segmentation) or
            ``(B, num_classes)`` (classification).
        recipe: the checkpoint's full recipe (as saved by the finetune engine; ``recipe["build"]`` rebuilds it).
        preprocessing: the plain preprocessing recipe (module docstring).
        source: what was loaded (path or URI, as given).
    """

    network: torch.nn.Module
    recipe: dict[str, Any]
    preprocessing: dict[str, Any]
    source: str


def _is_uri(src: str) -> bool:
    return src.startswith(_MLFLOW_SCHEMES) or (bool(_SCHEME.match(src)) and not src.startswith("file:")
                                               and not Path(src).exists())


def _download(src: str, tracking_uri: str | None, dst: str) -> Path:
    """Download an MLflow URI into ``dst``; ``runs:/<id>`` alone means its ``checkpoints/best.pt``."""
    from medssl.tracking.artifacts import download_uri

    target = src
    if target.startswith("runs:/") and len(target.removeprefix("runs:/").strip("/").split("/")) == 1:
        target = target.rstrip("/") + "/checkpoints/best.pt"
    return download_uri(target, dst, tracking_uri=tracking_uri, what="model", shown=src)


def resolve_source(source: str | Path, tmp: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The local checkpoint file of ``source`` (downloading an MLflow URI into ``tmp``).

    Raises:
        MedsslError: nothing at ``source``, a folder without (exactly one) finetune checkpoint, or a failed
            download — naming ``source``.
    """
    src = str(source)
    path = _download(src, tracking_uri, str(tmp)) if _is_uri(src) else Path(src.removeprefix("file://"))
    if path.is_dir():
        for cand in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if cand.is_file():
                return cand
        found = sorted(p for p in path.rglob("*.pt") if p.name != "last.pt")
        if len(found) != 1:
            raise MedsslError(
                f"model {src}: expected checkpoints/best.pt (or one .pt file) in the folder, found "
                f"{[str(p.relative_to(path)) for p in found][:5] or 'none'}"
            )
        return found[0]
    if not path.is_file():
        raise MedsslError(f"model {src} not found (expected a best.pt, a finetune run folder or an MLflow URI)")
    return path


def load_finetune_checkpoint(path: str | Path, *, source: str | None = None) -> dict[str, Any]:
    """Read a finetune checkpoint (``weights_only=True``) and check it holds a finetune recipe and weights.

    Raises:
        MedsslError: unreadable file, or not a finetune checkpoint (e.g. a pretraining one), naming it.
    """
    from medssl.engines.runtime.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    name = source or str(path)
    recipe = ckpt.get("recipe") or {}
    if not isinstance(recipe.get("build"), dict) or "task" not in recipe or not isinstance(ckpt.get("model"), dict):
        raise MedsslError(
            f"{name} is not a finetune checkpoint (its recipe has no 'build'/'task' or it holds no 'model' "
            "weights); an SSL pretraining checkpoint must be finetuned first (medssl finetune)"
        )
    return ckpt


def _class_names(recipe: dict[str, Any], config: dict[str, Any], out: int) -> dict[str, str]:
    """The class table: the plan's (datalist ``labels`` or label values), else the datalist's, else generic."""
    plan = recipe.get("plan") or {}
    if isinstance(plan.get("classes"), dict) and len(plan["classes"]) == out:
        return {str(k): str(v) for k, v in plan["classes"].items()}
    try:
        labels = json.loads(Path(config.get("datalist", "")).read_text()).get("labels")
    except (OSError, ValueError):
        labels = None
    if isinstance(labels, dict) and len(labels) == out:
        return {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    if recipe.get("task") == "segmentation":
        return {"0": "background"} | {str(i): f"class_{i}" for i in range(1, out)}
    return {str(i): f"class_{i}" for i in range(out)}


def preprocessing_recipe(recipe: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain preprocessing dict of a finetune checkpoint (keys: module docstring).

    Args:
        recipe: ``best.pt["recipe"]``.
        config: ``best.pt["config"]`` (the resolved :class:`~medssl.engines.finetune.config.FinetuneConfig`
            dict: sliding-window settings and augmentation).
    """
    config = config or {}
    build = recipe["build"]
    out = int(build["out_channels"])
    augment = recipe.get("augment") or config.get("augment") or {}
    flips = trained_flip_axes(augment)
    spacing = recipe.get("target_spacing", config.get("target_spacing"))
    return {
        "task": str(recipe["task"]),
        "in_channels": int(recipe.get("in_channels") or config.get("in_channels") or 1),
        "out_channels": out,
        "class_names": _class_names(recipe, config, out),
        "axcodes": "RAS",
        "target_spacing": [float(s) for s in spacing] if spacing is not None else None,
        "normalisation": str(recipe.get("normalisation") or config.get("normalisation") or "robust"),
        "ct_window": [float(v) for v in (recipe.get("ct_window") or config.get("ct_window") or (-1000.0, 1000.0))],
        "roi_size": [int(r) for r in (recipe.get("roi_size") or config["roi_size"])],
        "sw_overlap": float(config.get("sw_overlap", 0.25)),
        "sw_batch_size": int(config.get("sw_batch_size", 4)),
        "flip_axes": sorted(set(flips)),
    }


def load_model(
    source: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> DeployModel:
    """Load a finetuned network and its preprocessing recipe (sources: module docstring).

    Args:
        source: checkpoint file, run folder, or MLflow ``runs:/`` / ``models:/`` URI.
        device: where the network is placed (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        tracking_uri: MLflow store for URIs (default ``$MLFLOW_TRACKING_URI`` or ``./mlruns.db``).

    Returns:
        A :class:`DeployModel` (network in eval mode, gradients off).

    Raises:
        MedsslError: a bad source (missing, unreadable, not a finetune checkpoint, failed download) or weights
            that do not fit the network rebuilt from the recipe — naming ``source``.
    """
    from medssl.engines.finetune.build import rebuild_model

    src = str(source)
    with tempfile.TemporaryDirectory(prefix="medssl_model_") as tmp:
        ckpt = load_finetune_checkpoint(resolve_source(src, tmp, tracking_uri=tracking_uri), source=src)
    recipe = dict(ckpt["recipe"])
    try:
        network = rebuild_model(recipe)
        network.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise MedsslError(f"model {src}: the weights do not fit the network of its recipe: {e}") from e
    network = network.to(torch.device(device)).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    prep = preprocessing_recipe(recipe, ckpt.get("config"))
    log.info("loaded %s %s from %s (epoch %s)", recipe["build"]["kind"], prep["task"], src, ckpt.get("epoch"))
    return DeployModel(network=network, recipe=recipe, preprocessing=prep, source=src)
