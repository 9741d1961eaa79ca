"""Load SSL encoder weights into a downstream network, with a report that never hides a failed load.

Accepted checkpoint formats (``torch.save`` dicts, read with ``weights_only=True``; see
``medssl/engines/runtime/checkpoint.py``), each with a ``"recipe"``:

- a full pretraining checkpoint: ``{"recipe": {"encoder": <Encoder.recipe>, "in_channels", "roi_size",
  "target_spacing", "normalisation", "ct_window", ...}, "model": <method state dict>}``; the encoder
  weights are the ``encoder.`` entries of the method (``SSLMethod.encoder``);
- ``encoder.pt``: ``{"recipe": ..., "state_dict": <Encoder.state_dict()>}`` (``"encoder"`` is accepted as
  an alias of ``"state_dict"``).

A bare encoder recipe (``{"name", "class", "kwargs", "img_size", "downstream_kwargs"}``) in place of the
checkpoint recipe is accepted too (no preprocessing is then known). ``src`` may be a file, a folder
holding ``encoder.pt``, or an MLflow URI (``runs:/<run_id>/encoder/encoder.pt``, ``models:/name/1``,
``models:/name@alias``, ``mlflow-artifacts:/...``), downloaded with ``mlflow.artifacts``.

Finetuning options (defined in :mod:`medssl.networks.finetune_opts`, re-exported here and from :mod:`medssl.networks.downstream`):
:func:`freeze_encoder` (linear probe), :func:`layerwise_lr_groups` (layer-wise LR decay) and
:class:`EncoderWarmup` (encoder lr held at 0 for the first steps). :class:`TransferReport` and
:class:`TransferError` live in :mod:`medssl.networks.transfer_report` and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.downstream import (
    EncoderWarmup,
    encoder_prefix,
    freeze_encoder,
    layerwise_lr_groups,
    transfer_keys,
)
from medssl.networks.encoders import ENCODERS, Encoder, rebuild_encoder
from medssl.networks.encoders_unet import unet_stage_strides
from medssl.networks.transfer_report import TransferError, TransferReport

__all__ = [
    "SSLCheckpoint",
    "TransferReport",
    "TransferError",
    "load_ssl_checkpoint",
    "transfer_weights",
    "check_preprocessing",
    "freeze_encoder",
    "layerwise_lr_groups",
    "EncoderWarmup",
]

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_PRE_FIELDS = ("in_channels", "roi_size", "target_spacing", "normalisation", "ct_window")


@dataclass
class SSLCheckpoint:
    """SSL encoder weights plus the recipe they were trained with.

    Attributes:
        recipe: the checkpoint recipe; the encoder recipe is ``recipe["encoder"]``.
        encoder_state: encoder weights keyed as ``Encoder.state_dict()`` (``net.…``).
        source: where it was read from (path or URI).
    """

    recipe: dict[str, Any]
    encoder_state: dict[str, torch.Tensor]
    source: str = ""

    @property
    def encoder_recipe(self) -> dict[str, Any]:
        """``Encoder.recipe`` of the pretrained encoder."""
        return self.recipe["encoder"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the finetuning data must look like, from the recipe.

        Keys: ``in_channels``, ``roi_size`` (pretraining crop ``(D, H, W)``, voxels), ``target_spacing``
        (mm, ``None`` = native grid), ``normalisation``, ``ct_window`` (HU), ``img_size`` (input size the
        encoder is fixed to, ViT only, else ``None``) and ``size_divisor`` (input sides must be multiples).
        Fields the checkpoint does not record (e.g. a bare encoder recipe) are absent: unknown, not
        checked by :func:`check_preprocessing`.
        """
        enc = self.encoder_recipe
        pre = {k: self.recipe[k] for k in _PRE_FIELDS if k in self.recipe}
        if pre.get("in_channels") is None:
            pre["in_channels"] = _in_channels(enc)
        name, kw = enc.get("name"), enc.get("kwargs", {})
        pre["img_size"] = list(enc["img_size"]) if name == "vit" else None
        if name == "swinvit":
            pre["size_divisor"] = int(kw["patch_size"][0]) * 2**5
        elif name in ("segresnet", "segresnet_unet"):
            pre["size_divisor"] = 2 ** (len(kw["blocks_down"]) - 1)
        elif name == "vit":
            pre["size_divisor"] = int(kw["patch_size"][0])
        elif name == "unet":
            pre["size_divisor"] = 16
        elif name == "monai_unet":  # prod(strides) per axis; one int for every axis: their lcm
            pre["size_divisor"] = math.lcm(*unet_stage_strides(list(kw["strides"]))[-1])
        else:
            pre["size_divisor"] = 1
        return pre

    def encoder(self) -> Encoder:
        """The pretrained encoder itself (rebuilt from the recipe, weights loaded strictly)."""
        enc = rebuild_encoder(self.encoder_recipe)
        enc.load_state_dict(self.encoder_state)
        return enc


def _in_channels(enc: dict[str, Any]) -> int | None:
    kw = enc.get("kwargs", {})
    for k in ("in_channels", "in_chans", "n_input_channels"):
        if k in kw:
            return int(kw[k])
    return None


def _fetch(src: str, tracking_uri: str | None, tmp: str) -> Path:
    """Download an MLflow URI into ``tmp``; returns the local file or folder."""
    from medssl.tracking.artifacts import download_uri

    return download_uri(src, tmp, tracking_uri=tracking_uri, what="SSL checkpoint")


def load_ssl_checkpoint(src: str | Path, *, tracking_uri: str | None = None) -> SSLCheckpoint:
    """Read SSL encoder weights + recipe from a file, folder or MLflow URI (formats: module docstring).

    Args:
        src: ``.pt`` file, folder with ``encoder.pt``, or ``runs:/…`` / ``models:/…`` /
            ``mlflow-artifacts:/…`` URI.
        tracking_uri: MLflow store for URIs (default ``$MLFLOW_TRACKING_URI`` or ``./mlruns.db``).

    Raises:
        MedsslError: unreadable / missing file, no recipe, or no encoder weights in it.
    """
    src_s = str(src)
    with tempfile.TemporaryDirectory(prefix="medssl_ckpt_") as tmp:
        # an MLflow / remote URI has a scheme of 2+ letters ("C:/x" stays a Windows path)
        is_uri = bool(_SCHEME.match(src_s)) and not src_s.startswith("file:") and not Path(src_s).exists()
        path = _fetch(src_s, tracking_uri, tmp) if is_uri else Path(src_s.removeprefix("file://"))
        if path.is_dir():
            cands = [path / "encoder.pt"] if (path / "encoder.pt").is_file() else sorted(path.rglob("*.pt"))
            if len(cands) != 1:
                raise MedsslError(f"{src_s}: expected encoder.pt (or one .pt file), found {len(cands)}")
            path = cands[0]
        if not path.is_file():
            raise MedsslError(f"SSL checkpoint {src_s} not found")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error means an unusable file
            raise MedsslError(f"cannot read SSL checkpoint {src_s}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("recipe"), dict):
        raise MedsslError(f"{src_s} is not a medssl SSL checkpoint (no embedded recipe)")
    recipe = dict(raw["recipe"])
    if "encoder" not in recipe and "kwargs" in recipe:  # a bare encoder recipe
        recipe = {"encoder": recipe}
    if not isinstance(recipe.get("encoder"), dict) or recipe["encoder"].get("name") not in ENCODERS:
        raise MedsslError(f"{src_s}: recipe names no known encoder (known: {sorted(ENCODERS)})")
    state = raw.get("state_dict", raw.get("encoder"))
    if state is None and isinstance(raw.get("model"), dict):
        state = {k[len("encoder.") :]: v for k, v in raw["model"].items() if k.startswith("encoder.")}
    if not state:
        raise MedsslError(
            f"{src_s}: no encoder weights (expected 'state_dict', 'encoder' or 'model.encoder.*')"
        )
    logger.info(
        "read SSL checkpoint %s: encoder %s, %d tensors", src_s, recipe["encoder"]["name"], len(state)
    )
    return SSLCheckpoint(recipe=recipe, encoder_state=dict(state), source=src_s)


def transfer_weights(
    model: nn.Module,
    ckpt: SSLCheckpoint,
    *,
    target: str,
    min_match: float = 1.0,
    allow_partial: bool = False,
) -> TransferReport:
    """Load the checkpoint's encoder into ``model``'s pretrained part (``strict=False``) and report.

    The pretrained part is the encoder (:func:`~medssl.networks.downstream.transfer_keys`), plus the
    decoder an encoder-decoder family pretrains: ``upcat_*`` of ``BasicUNet`` from ``unet`` (Models
    Genesis), ``up_samples``/``up_layers`` of ``SegResNet`` from ``segresnet_unet`` and every up block but the
    top one of ``UNet`` from ``monai_unet`` (SparK). Checkpoint
    keys ``net.<k>`` become ``encoder_prefix(target) + <k>``; tensors with a destination of the same shape
    are loaded, everything else is reported. The SSL net's task head (the encoder's ``exclude_prefixes``,
    e.g. the U-Net's ``final_conv``) is skipped with a note; network keys outside the pretrained part are
    listed as ``new``. Nothing is loaded when the transfer fails.

    Args:
        model: a ``target`` network (e.g. from :func:`medssl.networks.downstream.build_downstream`).
        ckpt: from :func:`load_ssl_checkpoint`.
        target: ``"SwinUNETR"``, ``"UNETR"``, ``"SegResNet"``, ``"BasicUNet"``, ``"UNet"`` or ``"ResNet"``.
        min_match: least share (by element count) of the network's pretrained-part values to be loaded.
        allow_partial: load whatever matched even below ``min_match`` (a warning; never when nothing did).

    Raises:
        TransferError: (a ``MedsslError``) share below ``min_match`` without ``allow_partial``, or nothing
            matched at all; the message holds the report table naming missing / mismatched keys.
        ValueError: ``min_match`` outside (0, 1].
    """
    if not 0.0 < min_match <= 1.0:
        raise ValueError(f"min_match must be in (0, 1], got {min_match}")
    prefix = encoder_prefix(target)
    enc = ckpt.encoder_recipe
    report = TransferReport(target=target, source=ckpt.source)
    fits = sorted(enc.get("downstream_kwargs", {}))
    if target not in fits:
        report.notes.append(f"encoder {enc.get('name')!r} is not built for {target}; it transfers to: {fits}")
    excluded = ENCODERS[enc["name"]].exclude_prefixes
    dst = model.state_dict()
    enc_keys = transfer_keys(model, target, enc["name"])  # + the decoder the family pretrains
    enc_set = set(enc_keys)
    load: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for k, v in ckpt.encoder_state.items():
        sub = k[len("net.") :] if k.startswith("net.") else None
        if sub is not None and sub.startswith(excluded):
            skipped.append(k)  # task-specific part of the SSL net (e.g. the U-Net's final conv)
            continue
        name = prefix + sub if sub is not None else k
        if sub is None or name not in enc_set:
            report.unexpected.append(k)
            report.shapes[k] = tuple(v.shape)
        elif tuple(v.shape) != tuple(dst[name].shape):
            report.mismatched.append((name, tuple(v.shape), tuple(dst[name].shape)))
        else:
            load[name] = v
    bad = {k for k, _, _ in report.mismatched}
    if skipped:
        report.notes.append(
            f"{len(skipped)} checkpoint tensors of the SSL task head ({', '.join(excluded)}*) "
            "are not transferred"
        )
    report.new = [k for k in dst if k not in enc_set]
    report.matched = [k for k in enc_keys if k in load]
    report.missing = [k for k in enc_keys if k not in load and k not in bad]
    report.shapes |= {k: tuple(dst[k].shape) for k in report.missing}
    report.encoder_numel = int(sum(dst[k].numel() for k in enc_keys))
    report.matched_numel = int(sum(dst[k].numel() for k in report.matched))
    if not report.matched or (report.share < min_match and not allow_partial):
        why = "no encoder weight matched" if not report.matched else f"below min_match={min_match:.0%}"
        raise TransferError(
            f"SSL checkpoint does not fit the {target} network ({why}).\n{report.render()}"
            "Check the checkpoint's encoder recipe against the network arguments; pass allow_partial "
            "only if a partial initialisation is intended.",
            report,
        )
    result = model.load_state_dict(load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # only names taken from the model itself
    if report.share < 1.0 or report.unexpected:
        logger.warning("partial weight transfer: %s\n%s", report.summary(), report.render())
    else:
        logger.info("%s", report.summary())
    return report


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return False
        try:
            return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=1e-6))
        except (TypeError, ValueError):
            return list(a) == list(b)
    return a == b


def check_preprocessing(
    recipe_pre: dict[str, Any], finetune_pre: dict[str, Any], *, override: bool = False
) -> dict[str, Any]:
    """Refuse a finetuning preprocessing that contradicts the SSL checkpoint's.

    Compared, when the finetune config sets them: ``in_channels``, ``target_spacing`` (mm, 1e-4
    relative tolerance; ``None`` = native grid), ``normalisation``, ``ct_window`` (HU, when both
    normalise with ``"ct"``), and ``roi_size`` where the encoder constrains it: equal to ``img_size``
    for a ViT (fixed position embeddings), multiples of ``size_divisor`` (Swin: ``patch * 32``).
    Fields missing from ``finetune_pre`` are inherited from the checkpoint; fields missing from
    ``recipe_pre`` (not recorded) are not checked.

    Args:
        recipe_pre: ``SSLCheckpoint.preprocessing``.
        finetune_pre: the finetune run's preprocessing (same keys).
        override: accept the differences with a warning listing them.

    Returns:
        The effective preprocessing: ``recipe_pre`` updated with ``finetune_pre``.

    Raises:
        ConfigMismatchError: naming each differing field and both values (checkpoint, finetune).
    """
    diff: dict[str, tuple[object, object]] = {}
    for f in ("in_channels", "target_spacing", "normalisation"):
        if f not in finetune_pre or f not in recipe_pre:
            continue  # inherited, or not recorded by the checkpoint (a recorded None spacing = native grid)
        if not _same(recipe_pre.get(f), finetune_pre[f]):
            diff[f] = (recipe_pre.get(f), finetune_pre[f])
    norm = finetune_pre.get("normalisation", recipe_pre.get("normalisation"))
    if "ct_window" in finetune_pre and norm == "ct" and recipe_pre.get("normalisation") == "ct":
        if not _same(recipe_pre.get("ct_window"), finetune_pre["ct_window"]):
            diff["ct_window"] = (recipe_pre.get("ct_window"), finetune_pre["ct_window"])
    roi = finetune_pre.get("roi_size")
    if roi is not None:
        img, div = recipe_pre.get("img_size"), int(recipe_pre.get("size_divisor") or 1)
        if img is not None and not _same(list(img), list(roi)):
            diff["roi_size"] = (f"{list(img)} (ViT img_size)", list(roi))
        elif any(int(s) % div for s in roi):
            diff["roi_size"] = (f"multiples of {div}", list(roi))
    if diff and not override:
        raise ConfigMismatchError(diff, what="SSL checkpoint preprocessing vs finetune config")
    if diff:
        logger.warning(
            "finetune preprocessing overrides the SSL checkpoint's: %s",
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items())),
        )
    return dict(recipe_pre) | dict(finetune_pre)
