"""Parts of the finetuning MONAI bundles (``bundles/finetune_seg``, ``bundles/finetune_cls``) that MONAI lacks.

Every piece of ``configs/train.yaml`` / ``evaluate.yaml`` is a ``_target_``; MONAI provides the trainer, evaluator,
inferer, loss, optimizer, scheduler and handlers. What is medssl's lives here, each a plain function or class
constructible from plain arguments:

- :func:`split_items`: one role (training / validation / test) of medssl's datalist + splits at a fraction and seed.
- :func:`chain`: one ``Compose`` of several transform lists (preprocessing + crops + augmentation) without ``$``.
- :func:`finetune_network`: the CLI's network (from scratch or an SSL encoder through medssl's transfer).
- :func:`checkpoint_network`: a network with a checkpoint's weights (a medssl ``best.pt`` or a bundle one).
- :class:`MedsslMetrics`: medssl's Dice / HD95 (segmentation) or AUC / accuracy (classification) as an ignite
  metric, so a ``SupervisedEvaluator`` scores like ``medssl finetune``'s evaluation.
- :class:`MedsslMLFlowHandler`: MONAI's ``MLFlowHandler`` with medssl's tracking store and run tags, so a bundle run
  lands where ``medssl compare`` looks.
- :func:`check_overrides` / :func:`run_bundle` (from :mod:`medssl.bundles.check`): overrides naming a missing id or
  an unknown ``_target_`` fail with one error naming the id and the config file (MONAI would silently add the id or
  fail deep in instantiation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.metrics import Metric

from medssl.bundles.check import check_overrides, run_bundle
from medssl.errors import MedsslError

__all__ = [
    "split_items",
    "chain",
    "finetune_network",
    "checkpoint_network",
    "MedsslMetrics",
    "MedsslMLFlowHandler",
    "check_overrides",
    "run_bundle",
]

log = logging.getLogger(__name__)


def split_items(datalist: str | Path, splits: str | Path, *, fraction: float, seed: int, role: str,
                task: str = "segmentation", class_key: str = "class",
                num_classes: int | None = None) -> list[dict[str, Any]]:
    """The ``role`` items of :func:`medssl.engines.finetune.data.finetune_items` (same cases as the CLI's run).

    Args:
        datalist: datalist JSON (``medssl ingest``).
        splits: ``splits.json`` (``medssl split``).
        fraction: labelled fraction in percent, a key of the splits (e.g. ``100``).
        seed: split seed.
        role: ``"training"``, ``"validation"`` or ``"test"``.
        task, class_key, num_classes: as in ``finetune_items``.

    Raises:
        MedsslError: an unknown role, or what ``finetune_items`` refuses (unknown fraction / seed …).
    """
    from medssl.engines.finetune.data import finetune_items

    if role not in ("training", "validation", "test"):
        raise MedsslError(f"split_items role must be training|validation|test, got {role!r}")
    items = finetune_items(datalist, splits, fraction=fraction, seed=seed, task=task, class_key=class_key,
                           num_classes=num_classes)
    return items[role]


def chain(parts: Sequence[Any]) -> Any:
    """One MONAI ``Compose`` of ``parts``: transforms, lists of transforms or ``Compose`` objects, in order.

    Example: ``chain([preprocess_transforms(prep), crop_transforms(...), augment_transforms(...)])``.
    """
    from monai.transforms import Compose

    flat: list[Any] = []
    for p in parts:
        if isinstance(p, Compose):
            flat += list(p.transforms)
        elif isinstance(p, (list, tuple)):
            flat += list(p)
        else:
            flat.append(p)
    return Compose(flat)


def finetune_network(network: str, *, out_channels: int, task: str = "segmentation", in_channels: int = 1,
                     roi_size: Sequence[int] = (32, 32, 32), network_kwargs: Mapping[str, Any] | None = None,
                     init: str = "scratch", tracking_uri: str | None = None) -> torch.nn.Module:
    """The network ``medssl finetune`` builds (:func:`medssl.engines.finetune.build.build_model`).

    Args:
        network: ``UNet`` | ``SwinUNETR`` | ``UNETR`` | ``SegResNet`` | ``BasicUNet`` | ``ResNet`` ….
        out_channels: segmentation classes incl. background, or classification classes.
        task: ``"segmentation"`` or ``"classification"``.
        in_channels: image channels.
        roi_size: patch size in voxels (transformer encoders need it).
        network_kwargs: the network's keyword arguments (e.g. ``{"channels": [32, 64], "strides": [2]}``).
        init: ``"scratch"`` or ``"ssl:PATH_OR_URI"`` (an SSL checkpoint; weights transferred and reported).
        tracking_uri: MLflow store for an ``ssl:runs:/…`` init.

    Raises:
        MedsslError: a network that cannot be built with these arguments, or an SSL checkpoint that does not
            fit (``TransferError`` with the transfer table).
    """
    from medssl.engines.finetune.build import build_model
    from medssl.engines.finetune.config import FinetuneConfig

    counts = {"out_channels": int(out_channels)} if task == "segmentation" else {"num_classes": int(out_channels)}
    cfg = FinetuneConfig(task=task, network=network, network_kwargs=dict(network_kwargs or {}), init=init,
                         in_channels=int(in_channels), roi_size=[int(r) for r in roi_size], datalist="-",
                         splits="-", tracking_uri=tracking_uri, **counts)
    model, recipe, report, _ = build_model(cfg)
    if report is not None:
        log.info("SSL weights loaded: %.1f %% of the %s (%s)", 100 * report.share, network, init)
    return model


def _state_dict(obj: Any) -> dict[str, Any]:
    """The network weights of a loaded checkpoint: a medssl ``best.pt`` / ``last.pt`` (``"model"`` + recipe), an
    ignite ``{"model": …}`` save, or a plain state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise MedsslError("expected a state dict or a dict with 'model'")


def checkpoint_network(ckpt_path: str | Path, network: torch.nn.Module | None = None, *,
                       prep: Mapping[str, Any] | None = None,
                       device: str | torch.device = "cpu") -> torch.nn.Module:
    """A network in eval mode holding the weights of ``ckpt_path``.

    A medssl finetune checkpoint (``best.pt``, recipe inside) rebuilds its own network (``network`` is ignored)
    and, with ``prep``, must have been trained with the same ``normalisation`` / ``target_spacing`` /
    ``roi_size``; a bundle checkpoint (a state dict) is loaded into ``network``.

    Raises:
        MedsslError: a missing / unreadable file, a state dict without ``network`` or not fitting it, or a
            recipe whose preprocessing differs from ``prep`` (the differing keys named).
    """
    from medssl.engines.finetune.build import rebuild_model

    path = Path(ckpt_path)
    if not path.is_file():
        raise MedsslError(f"bundle ckpt_path {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        state = _state_dict(obj)
    except (OSError, RuntimeError, ValueError, MedsslError) as e:
        raise MedsslError(f"bundle ckpt_path {path} is not a readable checkpoint: {e}") from e
    recipe = obj.get("recipe") if isinstance(obj, dict) else None
    if recipe is not None:
        if prep is not None:
            diff = {k: (recipe.get(k), prep.get(k)) for k in ("normalisation", "target_spacing", "roi_size")
                    if k in prep and _norm(recipe.get(k)) != _norm(prep.get(k))}
            if diff:
                raise MedsslError(f"bundle ckpt_path {path} was trained with other preprocessing than the "
                                  f"bundle's (recipe, bundle): {diff}; override them to match")
        network = rebuild_model(recipe)
    elif network is None:
        raise MedsslError(f"bundle ckpt_path {path} holds only weights: pass network (the config's network_def)")
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise MedsslError(f"bundle ckpt_path {path} does not fit the network: {e}") from e
    return network.to(torch.device(device)).eval()


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _spacing(image: Any) -> list[float] | None:
    from monai.data.utils import affine_to_spacing

    return affine_to_spacing(image.affine, r=3).tolist() if hasattr(image, "affine") else None


def _per_item(output: Any) -> list[tuple[torch.Tensor, Any, list[float] | None]]:
    """``[(pred, label, spacing mm), …]`` of a (decollated) evaluator output: one entry per case."""
    items = output if isinstance(output, list) else [output]
    return [(it["pred"], it["label"], _spacing(it["image"])) for it in items]


class MedsslMetrics(Metric):
    """medssl's evaluation metrics as an ignite metric for MONAI's ``SupervisedEvaluator``.

    Segmentation accumulates :class:`medssl.engines.finetune.metrics.SegmentationMetrics` one case at a time from the
    logits ``(K, D, H, W)`` and label ``(1, D, H, W)`` (HD95 in mm from the image affine), classification
    gathers logits ``(K,)`` and labels for :func:`medssl.engines.finetune.metrics.classification_metrics`: the numbers of
    ``medssl finetune``'s validation / test. The metric's own name holds ``select`` (the selection metric,
    ``dice_mean`` / ``auc`` by default, used by ``CheckpointSaver`` / ``EarlyStopHandler``); every value is also
    written to ``engine.state.metrics`` as ``<prefix><name>`` (e.g. ``val_dice_1``, ``test_hd95_mean``).

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        num_classes: classes incl. background (segmentation) or classes (classification).
        prefix: prefix of the names written to ``engine.state.metrics``.
        select: the value the metric's own name holds; default medssl's selection metric of ``task``.
    """

    def __init__(self, task: str, num_classes: int, *, prefix: str = "", select: str | None = None) -> None:
        from medssl.engines.finetune.metrics import SELECTION_METRIC

        if task not in SELECTION_METRIC:
            raise MedsslError(f"MedsslMetrics task must be one of {sorted(SELECTION_METRIC)}, got {task!r}")
        self.task, self.num_classes, self.prefix = task, int(num_classes), prefix
        self.select = select or SELECTION_METRIC[task]
        super().__init__(output_transform=_per_item, skip_unrolling=True)

    def reset(self) -> None:
        from medssl.engines.finetune.metrics import SegmentationMetrics

        self._seg = SegmentationMetrics(self.num_classes) if self.task == "segmentation" else None
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: list[tuple[torch.Tensor, Any, list[float] | None]]) -> None:
        from medssl.engines.finetune.metrics import as_tensor

        for pred, label, spacing in output:
            logits = as_tensor(pred).float().cpu()
            if self._seg is not None:  # batch of one case, as medssl's evaluate_model
                self._seg.update(logits[None], as_tensor(label).cpu()[None], spacing)
            else:
                self._logits.append(logits.reshape(1, -1))
                self._labels.append(as_tensor(label).reshape(-1).cpu())

    def compute(self) -> dict[str, float]:
        from medssl.engines.finetune.metrics import classification_metrics

        if self._seg is not None:
            return self._seg.compute()
        if not self._logits:
            raise MedsslError("MedsslMetrics: no case was evaluated (empty data loader?)")
        return classification_metrics(torch.cat(self._logits), torch.cat(self._labels))

    def completed(self, engine: Any, name: str) -> None:
        values = self.compute()
        if self.select not in values:
            raise MedsslError(f"MedsslMetrics select {self.select!r} is not computed; choose from {sorted(values)}")
        for k, v in values.items():
            engine.state.metrics[f"{self.prefix}{k}"] = float(v)
        engine.state.metrics[name] = float(values[self.select])


def _mlflow_base() -> type:
    from monai.handlers import MLFlowHandler

    return MLFlowHandler


class MedsslMLFlowHandler(_mlflow_base()):  # type: ignore[misc]
    """MONAI's ``MLFlowHandler`` logging into medssl's store, experiment and run tags.

    Tags: :func:`medssl.tracking.mlflow_tracker.standard_tags` (``medssl.kind = finetune``, ``medssl.study``,
    ``medssl.fraction``, ``medssl.init``, ``medssl.seed``, ``medssl.git_sha``) + ``medssl.task``,
    ``medssl.network``, ``medssl.source = bundle`` and ``mlflow.parentRunId`` (a sweep's parent run), so
    ``medssl compare`` finds the run like a CLI child. Handlers of one run share ``run_name`` (MONAI reattaches
    the unfinished run of that name); the last one to finish sets ``close_on_complete``.

    Args:
        experiment_name: MLflow experiment (medssl's default ``medssl-finetune``).
        run_name: run name (required: MONAI would otherwise reattach any unfinished run of the experiment).
        tracking_uri: default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlruns.db`` (medssl's default); an
            explicit value wins over the variable (MONAI's handler has it the other way round).
        task, network, study, fraction, init, seed: tag values.
        parent_run_id: the sweep's parent run, or ``None``.
        tags: extra tags.
        **kwargs: ``MLFlowHandler`` arguments (``iteration_log``, ``output_transform``, ``close_on_complete`` …).
    """

    def __init__(self, *, run_name: str, experiment_name: str = "medssl-finetune", tracking_uri: str | None = None,
                 task: str = "segmentation", network: str | None = None, study: str | None = None,
                 fraction: float | None = None, init: str = "scratch", seed: int | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        from medssl.data.splits import fraction_key
        from medssl.tracking.mlflow_tracker import artifact_location, default_tracking_uri, standard_tags

        uri = tracking_uri or default_tracking_uri()
        kind = "scratch" if init == "scratch" else "ssl"
        self.medssl_tags = {
            **standard_tags("finetune", study=study, fraction=None if fraction is None else fraction_key(fraction),
                            init=kind, seed=seed),
            "medssl.task": task, "medssl.network": network, "medssl.source": "bundle",
            "mlflow.parentRunId": parent_run_id, **dict(tags or {}),
        }
        self.medssl_tags = {k: str(v) for k, v in self.medssl_tags.items() if v is not None}
        kwargs.setdefault("artifact_location", artifact_location(uri, experiment_name))
        super().__init__(tracking_uri=uri, experiment_name=experiment_name, run_name=run_name, **kwargs)
        from medssl.tracking.mlflow_tracker import make_client

        # MONAI lets $MLFLOW_TRACKING_URI win over the argument; medssl's rule is the reverse (an explicit store
        # wins, the variable is the default), as for CLI runs
        self.client = make_client(uri)

    def start(self, engine: Any) -> None:
        super().start(engine)
        for k, v in self.medssl_tags.items():
            self.client.set_tag(self.cur_run.info.run_id, k, v)
