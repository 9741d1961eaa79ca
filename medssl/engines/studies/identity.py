"""Sweeps that cannot mix configurations: what a sweep child was run with, and the refusal to reuse it when
that changed.

Each child records (MLflow tags ``medssl.config_hash`` / ``medssl.data_hash``, param ``config_hash``, and its
``sweep_child.json`` marker with the full config identity) the hash of its effective finetune config
(:func:`medssl.engines.finetune.identity.config_identity`: no seed/fraction/paths; the SSL encoder's sha256
included) and of its data (datalist + its split sets). A re-run compares them with the config the child
would run with now: a finished, failed or interrupted child run with another config or other data is never
reused or resumed; the sweep stops before running anything with a :class:`~medssl.errors.MedsslError` naming
the changed keys (old → new) and pointing to ``--new`` (a new parent run). Adding seeds or fractions keeps
every existing child's hashes, so it keeps working. The pretraining of a sweep is checked the same way
(:func:`pretrain_identity`).

Preprocessing is resolved once per sweep (:func:`resolve_preprocessing`): with an SSL arm, the encoder
recipe's spacing, normalisation, CT window and input channels, passed explicitly to the scratch *and* SSL
children, so both arms see identical inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medssl.engines.finetune.identity import config_changes
from medssl.errors import MedsslError

__all__ = ["PREPROCESSING_KEYS", "resolve_preprocessing", "pretrain_identity", "Conflict", "refuse_conflicts"]

log = logging.getLogger(__name__)

#: FinetuneConfig fields resolved from the SSL recipe for both arms of a sweep
PREPROCESSING_KEYS = ("target_spacing", "normalisation", "ct_window", "in_channels")
# the representation monitor (monitor_*) only observes: the encoder is the same with it on or off
_PRETRAIN_RUN_KEYS = ("out_dir", "run_name", "tags", "parent_run_id", "tracking_uri", "experiment", "datalist",
                      "splits", "monitor_every", "monitor_cases", "monitor_k", "cache", "cache_dir")
# the pool's storage never changes the encoder; data_shard="order" (default) is the stream from before the option
_PRETRAIN_NEUTRAL = {"data_shard": "order"}


def resolve_preprocessing(encoder: str | Path, finetune: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing both arms of a sweep use: the SSL recipe's, where the ``finetune`` mapping leaves a
    field unset (``None`` / absent); an explicit contradicting value stays (the SSL child then refuses it,
    :func:`medssl.networks.transfer.check_preprocessing`).

    Returns:
        ``{field: value}`` for :data:`PREPROCESSING_KEYS` the recipe records (``target_spacing`` ``None`` =
        native grid), to merge into every child's config.

    Raises:
        MedsslError: the encoder file cannot be read as an SSL checkpoint.
    """
    from medssl.networks.transfer import load_ssl_checkpoint

    pre = load_ssl_checkpoint(encoder).preprocessing
    out = {k: pre[k] for k in PREPROCESSING_KEYS if k in pre and finetune.get(k) is None}
    if out.get("ct_window") is None:
        out.pop("ct_window", None)
    if out.get("normalisation") is None:
        out.pop("normalisation", None)
    if out.get("in_channels") is None:
        out.pop("in_channels", None)
    log.info("preprocessing of both arms from the SSL recipe of %s: %s", encoder, out)
    return out


def pretrain_identity(config: Any) -> dict[str, Any]:
    """A :class:`~medssl.config.PretrainConfig` (or dict) without paths and MLflow bookkeeping."""
    import json

    from medssl.config import PretrainConfig

    cfg = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(dict(config))
    out = {k: v for k, v in cfg.to_dict().items()
           if k not in _PRETRAIN_RUN_KEYS and not (k in _PRETRAIN_NEUTRAL and v == _PRETRAIN_NEUTRAL[k])}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


class Conflict:
    """One child (or the pretraining) whose recorded config / data differs from the current one.

    Args:
        key: sweep key (``f10-ssl-s0``, ``pretrain``).
        status: what it is (``finished``, ``interrupted``, ``failed``).
        what: ``"config"`` or ``"data"``.
        old_hash, new_hash: the recorded and the current hash.
        old, new: the recorded and current identities (``None`` when not recorded: hashes only).
    """

    def __init__(self, key: str, status: str, what: str, old_hash: str, new_hash: str,
                 old: dict[str, Any] | None = None, new: dict[str, Any] | None = None) -> None:
        self.key, self.status, self.what = key, status, what
        self.old_hash, self.new_hash, self.old, self.new = old_hash, new_hash, old, new

    def describe(self) -> str:
        """``lr: 0.001 → 0.01, augment.flip_axes: [0, 1, 2] → [0]`` (or the hashes when keys are unknown)."""
        if self.what == "data":
            return f"data hash {self.old_hash} → {self.new_hash} (datalist or splits changed)"
        if self.old is None or self.new is None:
            return f"config hash {self.old_hash} → {self.new_hash} (changed keys not recorded)"
        changes = config_changes(self.old, self.new)
        return ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changes.items()) or (
            f"config hash {self.old_hash} → {self.new_hash}"
        )


def refuse_conflicts(study: str, conflicts: list[Conflict]) -> None:
    """Raise one MedsslError naming the changed keys of the first conflicting run and the others' keys.

    Raises:
        MedsslError: when ``conflicts`` is not empty.
    """
    if not conflicts:
        return
    first = conflicts[0]
    others = [c.key for c in conflicts[1:]]
    more = f"; also {len(others)} other run(s): {', '.join(others[:6])}{' …' if len(others) > 6 else ''}"
    raise MedsslError(
        f"study {study}: {first.status} run {first.key} was made with another {first.what}: "
        f"{first.describe()}{more if others else ''}. Its results must not be mixed with the new setting: "
        "start a new parent run with `medssl sweep <pipeline> --new` (or undo the change)"
    )
