"""Where the preprocessed pretraining pool lives: in RAM, in a persistent on-disk cache, or nowhere.

``cache="ram"`` (default) is the lazily filled in-memory :class:`SafeCacheDataset` of
every volume a rank draws. ``cache="disk"`` is a MONAI ``PersistentDataset`` (:class:`DiskCacheDataset`):
each volume is preprocessed once, written as one ``.pt`` file, and read back at every draw, so a rank's
memory does not grow with the pool (``benchmarks/pool_scale.py``). The folder is shared by every rank,
run and sweep child that uses the same preprocessing::

    <cache_dir>/<recipe key>/recipe.json        the preprocessing recipe (and MONAI version) of the key
    <cache_dir>/<recipe key>/<file key>.pt      {"image": Tensor (C, X, Y, Z) float32, "case_id": ...}

The recipe key hashes the preprocessing recipe (orientation, spacing, normalisation, CT window) and the
MONAI version, the file key hashes each image file's absolute path, size and modification time: a changed
recipe or a rewritten file never reads a stale entry. ``cache="none"`` preprocesses at every draw.

Under rank-sharded pretraining (``data_shard="pool"``) a rank builds its dataset over its own shard only
(:class:`ShardView` keeps the pool's indices), so a RAM cache holds only that shard and the ranks of a
first run build disjoint parts of a disk cache in parallel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.meta_tensor import MetaTensor
from monai.transforms import Compose

from medssl.errors import MedsslError

__all__ = ["CACHE_MODES", "DATA_SHARDS", "shard_indices", "SafeCacheDataset", "recipe_key", "file_key", "DiskCacheDataset",
           "ShardView", "make_pool_dataset"]

log = logging.getLogger(__name__)

CACHE_MODES = ("ram", "disk", "none")
_ERROR_KEY = "_medssl_load_error"  # the quarantine marker of medssl.engines.pretrain.data
_FORMAT = 1  # bump when the stored item layout changes: every old entry becomes a miss
#: how DDP ranks split the pool: "order" (each epoch's global order) or "pool" (a fixed partition)
DATA_SHARDS = ("order", "pool")


def shard_indices(n: int, seed: int, rank: int, world_size: int, shard: str = "order") -> np.ndarray:
    """The pool indices rank ``rank`` of ``world_size`` can ever draw (sorted as drawn by the partition).

    ``"order"`` or one process: all of ``range(n)``. ``"pool"``: ``permutation`` of ``range(n)`` by
    ``seed`` (its own stream, not an epoch's), padded to a multiple of ``world_size`` by repeating its head,
    cut ``[rank::world_size]``; e.g. ``n=7, world_size=2`` → 4 indices per rank, one of them shared.

    Raises:
        MedsslError: an unknown ``shard``.
    """
    if shard not in DATA_SHARDS:
        raise MedsslError(f"data_shard must be one of {DATA_SHARDS}, got {shard!r}")
    if shard == "order" or world_size == 1:
        return np.arange(n)
    part = np.random.default_rng([seed, 0, 0, 2]).permutation(n)  # [.., 2]: not any crop/epoch stream
    pad = -n % world_size
    part = np.concatenate([part, np.resize(part, pad)]) if pad else part
    return part[rank::world_size]


class SafeCacheDataset(CacheDataset):
    """``CacheDataset`` whose failing items become error markers instead of exceptions.

    A volume that cannot be loaded or preprocessed yields ``{"image": path, "_medssl_load_error": reason}``
    (cached, so it is tried once); :class:`CropBatcher` logs and skips it.
    """

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as e:  # noqa: BLE001 - any reader/transform failure quarantines this one volume
            return {"image": self.data[idx].get("image"), _ERROR_KEY: _reason(e)}


def _reason(e: Exception, n: int = 300) -> str:
    """``"TypeName: last line of the message"`` (at most ``n`` characters of it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {(text[-1] if text else '')[:n]}"


def recipe_key(prep: Mapping[str, Any]) -> str:
    """16 hex digits naming the cache folder of one preprocessing recipe.

    Args:
        prep: the plain preprocessing recipe (``axcodes``, ``target_spacing`` mm, ``normalisation``,
            ``ct_window`` HU; other keys ignored), e.g. ``{"axcodes": "RAS", "target_spacing": None,
            "normalisation": "robust", "ct_window": [-1000.0, 1000.0]}``.
    """
    return hashlib.sha256(json.dumps(_recipe_record(prep), sort_keys=True).encode()).hexdigest()[:16]


def _recipe_record(prep: Mapping[str, Any]) -> dict[str, Any]:
    spacing = prep.get("target_spacing")
    return {
        "axcodes": prep.get("axcodes", "RAS"),
        "target_spacing": None if spacing is None else [float(s) for s in spacing],
        "normalisation": prep.get("normalisation", "robust"),
        "ct_window": [float(v) for v in prep.get("ct_window", (-1000.0, 1000.0))],
        "monai": monai.__version__,  # a MONAI upgrade may resample differently: a new folder
        "format": _FORMAT,
    }


def file_key(item: Mapping[str, Any]) -> bytes:
    """Hex sha256 (as bytes, MONAI's ``hash_func`` contract) of a pool item's image file(s): absolute path,
    size and ``st_mtime_ns`` of each channel file in order; a missing file hashes as such (and then fails
    to load, which is quarantined, never cached)."""
    files = item["image"] if isinstance(item["image"], list) else [item["image"]]
    parts = []
    for f in files:
        try:
            st = os.stat(f)
            parts.append(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{os.path.abspath(f)}|missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest().encode()


class DiskCacheDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` keyed by (preprocessing recipe, file), safe under concurrent builders,
    with failing volumes quarantined.

    Two things are hand-written over MONAI's ``_cachecheck``: (1) MONAI writes into a ``tempfile`` folder
    (usually ``/tmp``) and ``shutil.move``\\ s it, which is a non-atomic copy when the cache is on another
    file system (a shared cluster folder), so a second rank could read a half-written file; here the
    temporary file lives in the cache folder itself and ``os.replace`` publishes it atomically (two ranks
    building the same entry both write whole files; the last rename wins, both are identical). (2) A
    volume that cannot be loaded or preprocessed becomes ``{"image": path, "_medssl_load_error": reason}``
    (not written to disk, so a repaired file is retried by the next run), as in
    :class:`SafeCacheDataset`.

    Args:
        data: pool items ``{"image": path | [paths], "case_id": str, ...}``.
        transform: the deterministic preprocessing ``Compose`` (:func:`medssl.engines.pretrain.data.preprocessing`).
        cache_dir: the shared cache root; the recipe's sub-folder is created in it.
        prep: the preprocessing recipe ``transform`` was built from (names the sub-folder).

    Raises:
        MedsslError: ``cache_dir`` cannot be created or written.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Compose,
        cache_dir: str | Path,
        prep: Mapping[str, Any],
    ) -> None:
        folder = Path(cache_dir) / recipe_key(prep)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            record = folder / "recipe.json"
            if not record.is_file():
                _atomic_write_bytes(record, json.dumps(_recipe_record(prep), indent=1).encode())
        except OSError as e:
            raise MedsslError(f"pool cache_dir {cache_dir} is not writable: {e}") from e
        super().__init__(data=data, transform=transform, cache_dir=folder, hash_func=file_key)

    def _cachecheck(self, item_transformed: Any) -> Any:
        hashfile = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode('utf-8')}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=True)
            except Exception as e:  # noqa: BLE001 - a corrupt/foreign entry is recomputed, never fatal
                log.warning("pool cache entry %s unreadable (%s): recomputing", hashfile, e)
        try:
            out = self._pre_transform(deepcopy(item_transformed))
        except Exception as e:  # noqa: BLE001 - any reader/transform failure quarantines this one volume
            return {"image": item_transformed.get("image"), _ERROR_KEY: _reason(e)}
        out = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in out.items()}
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=hashfile.parent, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as fh:
                torch.save(out, fh)
            os.replace(tmp, hashfile)
        except OSError as e:  # a full or read-only cache only costs speed: train on, recompute next time
            log.warning("cannot write pool cache entry %s: %s", hashfile, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class ShardView(Sequence):
    """The pool-indexed face of a dataset built over one rank's shard.

    ``view[i]`` is ``dataset[j]`` where ``indices[j] == i``; ``len(view)`` is the whole pool's, so a
    :class:`~medssl.engines.pretrain.data.CropBatcher` keeps drawing pool indices.

    Args:
        dataset: a dataset over ``[pool[i] for i in indices]``.
        indices: the pool indices of the shard (distinct).
        size: the pool size.

    Raises:
        IndexError: (on access) a pool index outside the shard, naming it.
    """

    def __init__(self, dataset: Sequence[Any], indices: Sequence[int], size: int) -> None:
        self.dataset, self.size = dataset, int(size)
        self.position = {int(i): j for j, i in enumerate(indices)}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:  # type: ignore[override]
        try:
            return self.dataset[self.position[int(idx)]]
        except KeyError:
            raise IndexError(f"pool index {idx} is not in this rank's shard ({len(self.position)} volumes)") from None


def make_pool_dataset(
    pool: Sequence[dict[str, Any]],
    transform: Compose,
    *,
    cache: str = "ram",
    cache_dir: str | Path | None = None,
    prep: Mapping[str, Any] | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> Sequence[Any]:
    """The pretraining dataset of a pool (or of one rank's shard of it), indexed by pool position.

    Args:
        pool: :func:`~medssl.engines.pretrain.pool.load_pool` items.
        transform: the deterministic preprocessing chain.
        cache: ``"ram"`` (in-memory ``CacheDataset``, filled lazily when ``num_workers == 0``, else up front
            by ``num_workers`` threads), ``"disk"`` (:class:`DiskCacheDataset` in ``cache_dir``) or
            ``"none"`` (preprocess at every draw).
        cache_dir: the disk cache root (``cache="disk"`` only).
        prep: the preprocessing recipe of ``transform`` (``cache="disk"``: names the cache folder).
        cache_rate: share of the (shard's) volumes kept by the RAM cache.
        num_workers: threads filling the RAM cache up front (0: lazily, in the training process).
        indices: the pool indices this rank draws; ``None`` = the whole pool (no :class:`ShardView`).

    Returns:
        An indexable of ``len(pool)`` items ``{"image": Tensor (C, X, Y, Z), ...}`` (or quarantine markers).

    Raises:
        MedsslError: an unknown ``cache``, or ``"disk"`` without ``cache_dir``.
    """
    if cache not in CACHE_MODES:
        raise MedsslError(f"pretraining cache must be one of {CACHE_MODES}, got {cache!r}")
    items = list(pool) if indices is None else [pool[int(i)] for i in indices]
    if cache == "ram":
        ds: Sequence[Any] = SafeCacheDataset(
            items, transform, cache_rate=cache_rate, num_workers=max(1, num_workers),
            runtime_cache=num_workers == 0, copy_cache=False, progress=False,
        )  # fmt: skip
    elif cache == "disk":
        if cache_dir is None:
            raise MedsslError("pretraining cache='disk' needs cache_dir (a folder shared by the ranks and runs)")
        ds = DiskCacheDataset(items, transform, cache_dir, prep or {})
        log.info("pool disk cache: %s (%d volumes on this rank)", ds.cache_dir, len(items))
    else:
        ds = Dataset(items, transform)
    return ds if indices is None else ShardView(ds, indices, len(pool))
