"""What makes two finetuning runs comparable: the config hash (MLflow tag ``medssl.config_hash``) and the
data hash of one (fraction, seed) (``medssl.data_hash`` of a sweep child).

The **config identity** of a run is its effective :class:`~medssl.engines.finetune.config.FinetuneConfig`
(every field, defaults filled in, resolved augmentation) without the run-specific keys (:data:`RUN_KEYS`:
fraction, seed, init path, output folder, MLflow bookkeeping, datalist/splits paths, which the data hash covers),
plus the init kind and, for an SSL init, the sha256 of the encoder file: children of one study cell differ only
in seed, and an SSL child of a re-pretrained encoder is another configuration. The **config hash** is the
first 16 hex digits of the sha256 of the identity as canonical JSON.

The **data hash** of a child covers the datalist file and the case ids of its own split sets (training
fraction, the seed's validation set, the test set), so adding seeds or fractions to a study (which rewrites
``splits.json``) leaves the hashes of existing children unchanged, while an edited datalist or changed sets
change them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_KEYS",
    "config_identity",
    "config_hash",
    "config_changes",
    "file_sha256",
    "split_data_hash",
    "run_config_hash",
]

#: FinetuneConfig fields that differ between the children of one study cell or only do bookkeeping
RUN_KEYS = (
    "fraction",
    "seed",
    "init",
    "out_dir",
    "run_name",
    "tags",
    "parent_run_id",
    "tracking_uri",
    "experiment",
    "study",
    "datalist",
    "splits",
)

#: fields added after studies ran: at these values they leave ``config_hash`` unchanged (older sweeps resume)
NEUTRAL_DEFAULTS = {"sampling": "posneg", "class_ratios": None, "planner": {}, "val_every_steps": 0,
                    "ssl_schedule": "none", "tta": False, "ema_decay": None,
                    "self_training": None}


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_identity(config: Any, *, encoder_sha256: str | None = None) -> dict[str, Any]:
    """The comparable part of a finetune config (see the module docstring).

    Args:
        config: a :class:`~medssl.engines.finetune.config.FinetuneConfig` or its dict (normalised through
            the dataclass, so ``lr: 0.001`` and ``lr: 1e-3`` or a partial ``augment`` give the same identity).
        encoder_sha256: sha256 of the SSL encoder file (SSL init); ``None`` from scratch or when unknown.

    Returns:
        ``{field: value}`` without :data:`RUN_KEYS` (and the :data:`NEUTRAL_DEFAULTS` at their values), plus
        ``init`` (``"scratch"`` / ``"ssl"``) and, for SSL, ``encoder_sha256``. ``ssl_schedule`` counts for SSL
        inits only, ``"auto"`` expanded to the schedule and rule it stands for
        (:func:`medssl.engines.runtime.schedules.ssl_schedule_identity`).

    Raises:
        MedsslError: ``config`` is not a valid FinetuneConfig dict.
    """
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.runtime.schedules import ssl_schedule_identity

    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig.from_dict(dict(config))
    out = {k: v for k, v in cfg.to_dict().items()
           if k not in RUN_KEYS and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    out["init"] = cfg.init_kind
    if cfg.init_kind == "ssl":
        out["encoder_sha256"] = encoder_sha256
        if "ssl_schedule" in out:  # "auto" = the schedule it stands for, with its rule (schedules.py)
            out["ssl_schedule"] = ssl_schedule_identity(out["ssl_schedule"])
    else:
        out.pop("ssl_schedule", None)  # acts on pretrained weights only: a scratch child keeps its hash
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # plain JSON values (tuples → lists)


def run_config_hash(config: Any) -> str:
    """``medssl.config_hash`` of a run: the sweep's tag when set, else :func:`config_hash` of the resolved config
    with the sha256 of a local SSL encoder file."""
    if config.tags.get("medssl.config_hash"):
        return str(config.tags["medssl.config_hash"])
    src = config.ssl_source
    sha = file_sha256(src) if src and Path(src).is_file() else None
    return config_hash(config_identity(config, encoder_sha256=sha))


def config_hash(identity: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of ``identity`` (:func:`config_identity`) as canonical JSON."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two identities: ``{"lr": (0.001, 0.01), "augment.flip_axes":
    ([0, 1, 2], [0])}``; a key missing on one side has the value ``"<unset>"`` there."""
    a, b = _flat(old), _flat(new)
    return {
        k: (a.get(k, "<unset>"), b.get(k, "<unset>"))
        for k in sorted(set(a) | set(b))
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    }


def split_data_hash(datalist: str | Path, splits: str | Path, *, seed: int, fraction: float) -> str:
    """16 hex digits of the sha256 of the datalist bytes and the case ids of one (seed, fraction): training
    fraction, the seed's validation set, the fixed test set.

    Raises:
        MedsslError: unreadable files, or the seed / fraction missing from the splits.
    """
    from medssl.data.splits import fraction_key, load_splits
    from medssl.errors import MedsslError

    sp = load_splits(splits)
    s = sp["seeds"].get(str(int(seed)))
    fk = fraction_key(fraction)
    if s is None or fk not in s["fractions"]:
        raise MedsslError(f"{splits}: no fraction {fk} % for seed {seed}")
    sets = {"training": s["fractions"][fk], "validation": s["validation"], "test": sp["test"]}
    try:
        h = hashlib.sha256(Path(datalist).read_bytes())
    except OSError as e:
        raise MedsslError(f"cannot read datalist {datalist}: {e}") from e
    h.update(json.dumps(sets, sort_keys=True).encode())
    return h.hexdigest()[:16]
