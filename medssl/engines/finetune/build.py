"""Finetuning networks from a :class:`~medssl.engines.finetune.config.FinetuneConfig`: :func:`build_model` (from
scratch, or from an SSL checkpoint with its weights transferred and reported, plus the preprocessing the run must
use), :func:`rebuild_model` (a network from a finetune checkpoint's recipe), :func:`single_param_group` (whether
the optimizer splits encoder and head) and :func:`param_groups` (the optimizer's groups and the pretrained part's
lr factor). The config dataclass is :mod:`medssl.engines.finetune.config`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from medssl.engines.finetune.config import SCRATCH_ONLY, FinetuneConfig
from medssl.errors import ConfigMismatchError, MedsslError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_model", "rebuild_model", "single_param_group", "param_groups"]

log = logging.getLogger(__name__)


def single_param_group(config: FinetuneConfig) -> bool:
    """Whether the finetuning optimizer gets one param group (no encoder / head split): a :data:`SCRATCH_ONLY`
    network, or a from-scratch ``UNet`` without ``llrd`` / ``encoder_warmup_steps`` — what every UNet run used
    before the UNet took SSL inits (same updates as the split groups at lr scale 1, and their checkpoints'
    optimizer state still resumes)."""
    if config.network in SCRATCH_ONLY:
        return True
    return (config.network == "UNet" and config.init_kind == "scratch" and config.llrd is None
            and not config.encoder_warmup_steps)


def param_groups(
    model: nn.Module, config: FinetuneConfig, ssl_plan: dict[str, Any] | None, family: str | None
) -> tuple[list[dict[str, Any]], Callable[[int], float] | None]:
    """The finetuning optimizer's param groups and the pretrained part's lr factor of the step.

    One group for :func:`single_param_group`; with an SSL schedule (``ssl_plan``, from
    :func:`~medssl.engines.runtime.schedules.resolve_ssl_schedule`) layer-wise groups whose pretrained part (the
    keys ``family``'s transfer loads) runs at ``encoder_lr_scale`` × lr behind the factor
    :func:`~medssl.engines.runtime.schedules.pretrained_lr_factor` (frozen, then warmed up); else layer-wise
    groups with ``config.llrd`` (1.0: all at lr) and no factor.
    """
    from medssl.engines.runtime.schedules import pretrained_lr_factor
    from medssl.networks.downstream import layerwise_lr_groups, transfer_key_prefixes

    if single_param_group(config):  # no encoder/head split: one group
        return [{"params": list(model.parameters())}], None
    if ssl_plan is None:
        return layerwise_lr_groups(model, config.network, config.lr, config.llrd or 1.0), None
    plan = ssl_plan
    groups = layerwise_lr_groups(
        model, config.network, config.lr, plan["llrd"] or config.llrd or 1.0,
        pretrained=transfer_key_prefixes(config.network, family), pretrained_scale=plan["encoder_lr_scale"],
    )  # fmt: skip
    log.info("SSL schedule: pretrained part frozen for %d steps, then warmed up over %d steps to %.3g x lr (llrd %s)",
             plan["freeze_steps"], plan["warmup_steps"], plan["encoder_lr_scale"], plan["llrd"] or config.llrd)
    return groups, partial(pretrained_lr_factor, freeze_steps=plan["freeze_steps"], warmup_steps=plan["warmup_steps"])


def _head_kwargs(kind: str, network_kwargs: dict[str, Any], encoder_recipe: dict[str, Any],
                 roi: list[int]) -> dict[str, Any]:
    """Split ``network_kwargs`` for an SSL init: encoder-shaping ones (``depth``, ``feature_size`` …, the encoder
    family's build arguments) must describe the same encoder as the SSL recipe and are then dropped (the recipe
    builds the encoder); the rest (decoder/head settings) pass through. The same pipeline file thus serves both
    inits; a contradiction is refused naming the differing constructor fields. A recipe of another encoder
    family is not compared: :func:`build_model` then reports what a transfer misses (``TransferError``)."""
    import inspect

    from medssl.networks.downstream import ENCODER_FAMILY, scratch_recipe
    from medssl.networks.encoders import ENCODERS

    build_args = set(inspect.signature(ENCODERS[ENCODER_FAMILY[kind]].build).parameters) - {"cls"}
    enc_kw = {k: v for k, v in network_kwargs.items() if k in build_args}
    if enc_kw and kind in encoder_recipe.get("downstream_kwargs", {}):  # else a family mismatch (see above)
        import torch

        # the throw-away encoder built for the comparison must not draw from the RNG: the SSL arm's new layers
        # then start from exactly the scratch arm's initial values (same seed)
        with torch.random.fork_rng(devices=[]):
            ours = scratch_recipe(kind, **({"in_channels": 1, "img_size": roi} | enc_kw))
        a = ours.get("downstream_kwargs", {}).get(kind, {})
        b = encoder_recipe.get("downstream_kwargs", {}).get(kind, {})
        clash = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                 if k not in ("in_channels", "img_size") and str(a.get(k)) != str(b.get(k))}
        if clash:
            raise ConfigMismatchError(clash, what=f"network_kwargs {enc_kw} vs the SSL encoder recipe")
    return {k: v for k, v in network_kwargs.items() if k not in build_args}


def build_model(config: FinetuneConfig) -> tuple[nn.Module, dict[str, Any], Any, dict[str, Any]]:
    """Build the downstream network (from scratch, or from an SSL checkpoint with its weights loaded).

    Returns:
        ``(model, recipe, transfer report or None, preprocessing)``; ``recipe["build"]`` rebuilds the
        network (:func:`rebuild_model`), ``preprocessing`` holds ``normalisation``, ``target_spacing`` (mm),
        ``ct_window`` (HU), ``roi_size`` as the run must use them.

    Raises:
        ConfigMismatchError: explicit preprocessing contradicting the SSL recipe (without override), or
            network kwargs contradicting its encoder.
        TransferError: (``MedsslError``) the checkpoint does not fit the network; ``.report`` holds the table.
    """
    from medssl.engines.runtime import checkpoint as ck  # torch & MONAI only when a model is built
    from medssl.networks.downstream import build_downstream
    from medssl.networks.transfer import check_preprocessing, load_ssl_checkpoint, transfer_weights

    if config.auto_fields:
        raise MedsslError(
            f"fields {config.auto_fields} are still 'auto': resolve them first "
            "(medssl.engines.finetune.plan.resolve_plan, done by the Finetuner at run start)"
        )
    kind, roi = config.network, list(config.roi_size)
    out = int(config.out_channels) if config.task == "segmentation" else config.num_classes
    explicit = {"roi_size": roi} | {
        k: getattr(config, k)
        for k in ("target_spacing", "normalisation", "ct_window", "in_channels")
        if getattr(config, k) is not None
    }
    report, src = None, config.ssl_source
    scratch_kw = {"in_channels": int(config.in_channels or 1), "img_size": roi, **config.network_kwargs}
    if src is None:
        build = {"kind": kind, "recipe": None, "out_channels": out, "kwargs": scratch_kw}
        if kind in SCRATCH_ONLY or kind == "UNet":  # UNet: the recipe its scratch runs always had
            build["kwargs"] = scratch_kw = {"in_channels": int(config.in_channels or 1), **config.network_kwargs}
        try:
            model = _build(kind, out, scratch_kw)
        except (TypeError, ValueError) as e:
            raise MedsslError(f"cannot build {kind} with network_kwargs {config.network_kwargs}: {e}") from e
        pre = {"normalisation": "robust", "target_spacing": None, "ct_window": [-1000.0, 1000.0]} | explicit
    else:
        ckpt = load_ssl_checkpoint(src, tracking_uri=config.tracking_uri)
        pre = check_preprocessing(ckpt.preprocessing, explicit, override=config.override_preprocessing)
        net_kw = _head_kwargs(kind, config.network_kwargs, ckpt.encoder_recipe, roi)
        build = {"kind": kind, "recipe": ckpt.encoder_recipe, "out_channels": out, "kwargs": net_kw}
        try:
            model = build_downstream(kind, recipe=ckpt.recipe, out_channels=out, **net_kw)
        except ConfigMismatchError:
            raise
        except MedsslError:  # encoder family cannot build this network: report what a transfer would miss
            model = build_downstream(kind, recipe=None, out_channels=out, **scratch_kw)
            transfer_weights(model, ckpt, target=kind, min_match=config.min_transfer_match)
            raise
        report = transfer_weights(
            model,
            ckpt,
            target=kind,
            min_match=config.min_transfer_match,
            allow_partial=config.allow_partial_transfer,
        )
        pre = {k: v for k, v in pre.items() if v is not None or k == "target_spacing"}
    pre.setdefault("normalisation", "robust")
    pre["ct_window"] = list(pre.get("ct_window") or [-1000.0, 1000.0])
    recipe = {
        "build": build,
        "task": config.task,
        "in_channels": int(pre.get("in_channels") or 1),
        "roi_size": roi,
        "target_spacing": pre.get("target_spacing"),
        "normalisation": pre["normalisation"],
        "ct_window": pre["ct_window"],
        "init": config.init,
        "ssl_pool": ckpt.recipe.get("pool") if src is not None else None,  # what the encoder saw (leakage)
        "versions": ck.library_versions(),
        "machine": ck.machine_info(),  # runs repeat bit for bit only on the same kind (runtime.checkpoint)
    }
    return model, recipe, report, pre


def rebuild_model(recipe: dict[str, Any]) -> nn.Module:
    """A fresh network from a finetune checkpoint's recipe (load ``best.pt["model"]`` into it)."""
    from medssl.networks.downstream import build_downstream

    b = recipe["build"]
    if b["recipe"] is None:
        return _build(b["kind"], b["out_channels"], b["kwargs"])
    return build_downstream(b["kind"], recipe=b["recipe"], out_channels=b["out_channels"], **b["kwargs"])


def _build(kind: str, out_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """A from-scratch network: MONAI ``UNet`` (3D, residual units; ``channels``, ``strides``,
    ``num_res_units`` … from ``kwargs``) here, as UNet runs always recorded it (``build.kwargs`` without
    ``img_size``; the same network, key for key and initial value for value, as ``build_downstream("UNet")``
    from the ``monai_unet`` family's arguments), the other kinds by ``build_downstream``."""
    if kind == "UNet":
        from monai.networks.nets import UNet

        kw = {"num_res_units": 2} | dict(kwargs)
        return UNet(spatial_dims=3, out_channels=out_channels, **kw)
    from medssl.networks.downstream import build_downstream

    return build_downstream(kind, recipe=None, out_channels=out_channels, **kwargs)
