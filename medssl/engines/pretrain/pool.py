"""The unlabelled pretraining pool: which volumes a run may see (:func:`load_pool`: datalist sections, or the
study-wide ``pretrain_pool`` of ``splits.json``), their channel count (:func:`pool_channels`,
:func:`resolve_in_channels`) and what a checkpoint recipe records about them (:func:`pool_record`,
:func:`pool_fingerprint`; contract in ``docs/CONTRACTS.md``, "Pretraining pool and leakage").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["load_pool", "pool_channels", "pool_record", "resolve_in_channels", "pool_fingerprint"]

log = logging.getLogger(__name__)


def load_pool(
    datalist: str | Path,
    sections: Sequence[str] = ("unlabeled", "training"),
    splits: str | Path | None = None,
    split_seed: int | None = None,
) -> list[dict[str, Any]]:
    """The unlabelled pretraining pool (labels dropped; no duplicates).

    Without ``splits``: every image of ``sections``. With a ``splits.json`` of ``medssl split``: the images
    of *any* datalist section whose ``case_id`` is in the study-wide ``pretrain_pool`` (every volume outside
    the test set and **every** seed's validation set, patient groups included; derived for version-1 files),
    so one encoder serves every seed without having seen a held-out case. ``split_seed`` picks that seed's
    pool instead (``splits["unlabeled"][seed]``: it holds the other seeds' validation cases, so finetuning
    those seeds with it fails :func:`medssl.engines.finetune.leakage.check_pretrain_leakage`). A non-medssl splits file
    falls back to ``sections`` minus every case id listed under a key containing ``val`` or ``test``.

    Args:
        datalist: MONAI datalist JSON; relative paths are resolved against its folder.
        sections: sections to take images from (without splits); missing sections are ignored.
        splits: optional ``splits.json``.
        split_seed: ``None`` (default): the study-wide pool; an int: that seed's pool.

    Returns:
        ``[{"image": absolute path, "case_id": str}, ...]``; a multi-channel item keeps its list of channel
        files (``"image": [path_c0, path_c1, ...]``, fixed order) and its ``"channels"`` names if given.

    Raises:
        MedsslError: unreadable datalist/splits, unknown split seed or an empty pool.
    """
    datalist = Path(datalist)
    data = _read_json(datalist, "datalist")
    keep: set[str] | None = None
    held_out: set[str] = set()
    if splits:
        sp = _read_json(Path(splits), "splits")
        if isinstance(sp.get("unlabeled"), dict) and sp["unlabeled"]:
            keep = _medssl_pool(Path(splits), sp, split_seed)
            sections = [k for k, v in data.items() if isinstance(v, list)]
        else:
            held_out = _held_out_cases(sp)
    items, seen = [], set()
    for section in sections:
        for it in data.get(section, []):
            image = it["image"] if isinstance(it, dict) else it
            paths = [_resolve(datalist, p) for p in image] if isinstance(image, list) else _resolve(datalist, image)
            first = paths[0] if isinstance(paths, list) else paths
            case_id = it.get("case_id", Path(first).name) if isinstance(it, dict) else Path(first).name
            if str(paths) in seen or case_id in held_out or (keep is not None and case_id not in keep):
                continue
            seen.add(str(paths))
            item = {"image": paths, "case_id": case_id}
            if isinstance(it, dict) and it.get("channels"):
                item["channels"] = list(it["channels"])
            items.append(item)
    if not items:
        raise MedsslError(
            f"no pretraining images in sections {list(sections)} of {datalist}"
            + (f" (splits {splits}, seed {split_seed})" if splits else "")
        )
    log.info("pretraining pool: %d volumes from %s", len(items), datalist)
    return items


def _resolve(datalist: Path, image: str) -> str:
    return str(Path(image) if Path(image).is_absolute() else (datalist.parent / image).resolve())


def _medssl_pool(path: Path, sp: dict[str, Any], split_seed: int | None) -> set[str]:
    """Case ids of the study-wide pool, or of ``split_seed``'s pool, of a medssl ``splits.json``."""
    if split_seed is not None:
        pools = sp["unlabeled"]
        if str(split_seed) not in pools:
            raise MedsslError(f"split seed {split_seed} not in {path} (seeds: {sorted(pools)})")
        log.warning("pretraining on seed %s's pool of %s: it holds the other seeds' validation cases (use the "
                    "study-wide pretrain_pool, split_seed=None, for multi-seed studies)", split_seed, path)
        return set(pools[str(split_seed)])
    if isinstance(sp.get("pretrain_pool"), list):
        return set(sp["pretrain_pool"])
    from medssl.data.splits_io import load_splits  # version 1: derives the study-wide pool

    return set(load_splits(path)["pretrain_pool"])


def pool_channels(pool: Sequence[dict[str, Any]], source: str | Path = "the pool") -> int:
    """Channels per case of a pool, equal for all: ``len(item["channels"])`` when present (also an MSD 4D file,
    one path with channels last), else ``len(image)`` for a list of channel files, else 1.

    Raises:
        MedsslError: cases with different channel counts, naming one case of each count and ``source``.
    """
    by_count: dict[int, str] = {}
    for it in pool:
        n = len(it["channels"]) if it.get("channels") else len(it["image"]) if isinstance(it["image"], list) else 1
        by_count.setdefault(n, it["case_id"])
    if len(by_count) > 1:
        named = ", ".join(f"case {c} has {n}" for n, c in sorted(by_count.items()))
        raise MedsslError(f"{source}: cases have different channel counts ({named}); one study, one channel set")
    return next(iter(by_count), 1)


def resolve_in_channels(config: Any, pool: Sequence[dict[str, Any]]) -> Any:
    """``config`` (a :class:`~medssl.config.PretrainConfig`) with ``in_channels`` set to the pool's channel
    count when it is ``None``; an explicit value must match it.

    Raises:
        MedsslError: mixed channel counts in the pool, or ``in_channels`` contradicting the data (naming a
            case and both counts).
    """
    channels = pool_channels(pool, config.datalist)
    if config.in_channels is None:
        return config.replace(in_channels=channels)
    if int(config.in_channels) != channels:
        raise MedsslError(
            f"in_channels={config.in_channels} but the pretraining pool of {config.datalist} has {channels} "
            f"channel(s) per case (e.g. case {pool[0]['case_id']}); leave in_channels unset to use the data's"
        )
    return config


def pool_record(pool: Sequence[dict[str, Any]], splits: str | Path | None, split_seed: int | None) -> dict[str, Any]:
    """What a checkpoint recipe records about its pretraining pool (``recipe["pool"]``, see
    :mod:`medssl.engines.finetune.leakage`): sorted case ids, :func:`pool_fingerprint`, the splits file's sha256 and
    which pool of it was used."""
    digest = hashlib.sha256(Path(splits).read_bytes()).hexdigest() if splits and Path(splits).exists() else None
    source = "sections" if not splits else "pretrain_pool" if split_seed is None else f"unlabeled[{split_seed}]"
    return {"case_ids": sorted(str(it["case_id"]) for it in pool), "fingerprint": pool_fingerprint(list(pool)),
            "splits_sha256": digest, "source": source}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MedsslError(f"cannot read {what} {path}: {e}") from e


def _held_out_cases(data: dict[str, Any]) -> set[str]:
    """Case ids under any key containing ``val`` or ``test``."""
    out: set[str] = set()

    def collect(node: Any, held: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, held or "val" in str(k).lower() or "test" in str(k).lower())
        elif isinstance(node, list):
            for v in node:
                collect(v, held)
        elif held and isinstance(node, str):
            out.add(node)

    collect(data, False)
    return out


def pool_fingerprint(pool: list[dict[str, Any]]) -> str:
    """Short sha256 over the pool's case ids and file sizes (identifies the data without reading it); a
    multi-channel item contributes the sizes of its channel files in order."""
    h = hashlib.sha256()
    for it in sorted(pool, key=lambda x: x["case_id"]):
        files = it["image"] if isinstance(it["image"], list) else [it["image"]]
        sizes = ",".join(str(os.path.getsize(f) if os.path.exists(f) else -1) for f in files)
        h.update(f"{it['case_id']}:{sizes};".encode())
    return h.hexdigest()[:16]
