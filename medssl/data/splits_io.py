"""Reading and writing ``splits.json`` (schema: :mod:`medssl.data.splits`) and decathlon datalists."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medssl.errors import MedsslError

__all__ = ["SPLITS_VERSION", "datalist_items", "load_splits", "write_splits"]

logger = logging.getLogger(__name__)

#: version 2: patient groups kept whole and a study-wide ``pretrain_pool``; version 1 files still load
SPLITS_VERSION = 2
_READABLE_VERSIONS = (1, 2)


def write_splits(splits: dict, path: str | Path) -> Path:
    """Write ``splits`` as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1) + "\n")
    return path


def load_splits(path: str | Path) -> dict:
    """Read a ``splits.json`` (version 1 or 2) and check its schema.

    A version-1 file has no ``pretrain_pool``: it is derived here as every case id of the file outside the
    test set and every seed's validation set (the intersection of the per-seed ``unlabeled`` pools). Version-1
    files were drawn per case, not per patient group: ``medssl split --report`` shows whether groups cross.

    Raises:
        MedsslError: unreadable file, unknown version, or missing ``test``/``seeds``/``unlabeled``/
            ``pretrain_pool`` sections.
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{path}: cannot read splits ({e})") from e
    if not isinstance(splits, dict) or splits.get("version") not in _READABLE_VERSIONS:
        raise MedsslError(f"{path}: not a medssl splits file of version {' or '.join(map(str, _READABLE_VERSIONS))}")
    for key in ("test", "seeds", "unlabeled") + (("pretrain_pool",) if splits["version"] >= 2 else ()):
        if key not in splits:
            raise MedsslError(f"{path}: splits file lacks '{key}'")
    for seed, s in splits["seeds"].items():
        if "validation" not in s or "fractions" not in s:
            raise MedsslError(f"{path}: seed {seed} lacks 'validation' or 'fractions'")
    if "pretrain_pool" not in splits:
        held = set(splits["test"]).union(*(s["validation"] for s in splits["seeds"].values()))
        everything = set().union(*splits["unlabeled"].values()) | held
        splits["pretrain_pool"] = sorted(everything - held)
        logger.info("%s: version-1 splits; study-wide pretrain_pool derived (%d cases outside test and every "
                    "validation set)", path, len(splits["pretrain_pool"]))
    return splits


def datalist_items(datalist: str | Path) -> dict[str, list[dict]]:
    """The items of a decathlon datalist per section (``training``, ``validation``, ``test``, ``unlabeled``);
    bare path strings become ``{"image": path}``.

    Raises:
        MedsslError: unreadable file or not a JSON object of sections.
    """
    datalist = Path(datalist)
    try:
        dl = json.loads(datalist.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{datalist}: cannot read datalist ({e})") from e
    if not isinstance(dl, dict):
        raise MedsslError(f"{datalist}: not a decathlon datalist (expected a JSON object with sections)")
    return {s: [it if isinstance(it, dict) else {"image": it} for it in dl.get(s) or []]
            for s in ("training", "validation", "test", "unlabeled")}
