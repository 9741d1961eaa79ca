"""Pretraining data: a MONAI ``CacheDataset`` of normalised volumes and a restorable random-crop batcher.

The per-step work is only: pick the next cached volumes of the epoch's order (cut to at most
``source_size`` at a random position), hand them as a list to the batched on-device augmentation,
which pads them, draws the views and stacks ``(B, C, D, H, W)``. The order is
``permutation(seed, epoch)`` and each window offset is drawn from an RNG seeded with
``(seed, epoch, position)``, so the data position ``(epoch, position)`` is all a checkpoint needs.

Which volumes make the pool (``load_pool``, ``pool_channels``, ``pool_record``, ``resolve_in_channels``,
``pool_fingerprint``) is :mod:`medssl.engines.pretrain.pool`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from medssl.engines.pretrain.pool_cache import shard_indices
from medssl.errors import MedsslError

__all__ = ["preprocessing", "preprocessing_recipe", "CropBatcher"]

log = logging.getLogger(__name__)

_ERROR_KEY = "_medssl_load_error"


def preprocessing(
    normalisation: str = "robust",
    target_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> Compose:
    """Deterministic chain: load → channel first → RAS → optional resampling (mm) → normalise → float32; the
    one preprocessing chain (:func:`medssl.transforms.preprocess.preprocess_transforms`) without metadata.

    Args:
        normalisation: ``"robust"`` (per-volume 0.5–99.5 percentile scaling to [0, 1], robust to the
            wildly different MRI scales), ``"ct"`` (``ct_window`` HU → [0, 1], clipped) or ``"none"``.
        target_spacing: voxel size in mm ``(x, y, z)``; ``None`` keeps the native grid.
        ct_window: HU range mapped to [0, 1], e.g. ``(-1000, 1000)``.

    Returns:
        A MONAI ``Compose`` mapping ``{"image": path}`` to ``{"image": Tensor (C, X, Y, Z)}``.

    Raises:
        ValueError: an unknown ``normalisation`` (a ``MedsslError``, which is a ``ValueError`` here too).
    """
    from medssl.transforms.preprocess import preprocess_transforms

    return preprocess_transforms(preprocessing_recipe(normalisation, target_spacing, ct_window), track_meta=False)


def preprocessing_recipe(
    normalisation: str = "robust",
    target_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> dict[str, Any]:
    """The plain recipe :func:`preprocessing` builds its chain from (also the disk cache's key,
    :func:`medssl.engines.pretrain.pool_cache.recipe_key`); arguments as there.

    Raises:
        ValueError: an unknown ``normalisation``.
    """
    from medssl.transforms.preprocess import NORMALISATIONS

    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be robust|ct|none, got {normalisation!r}")
    return {
        "task": "segmentation",
        "axcodes": "RAS",
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
        "normalisation": normalisation,
        "ct_window": [float(v) for v in ct_window],
    }


def _short(e: Exception, n: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else "")[:n]


class CropBatcher:
    """Restorable stream of volumes (or random windows of them) from a dataset of ``{"image": (C, X, Y, Z)}``.

    Args:
        dataset: indexable of dicts with ``"image"`` tensors (e.g. :class:`~medssl.engines.pretrain.pool_cache.SafeCacheDataset`).
        source_size: largest window ``(D, H, W)`` in voxels handed to the augmentation; larger volumes
            are cut at a random position (e.g. ``(96, 96, 96)`` for whole-body CT), smaller axes kept
            whole. ``None``: whole volumes (small MRI such as the hippocampus crops).
        seed: order/window seed.
        rank, world_size: DDP rank and number of ranks.
        shard: how the ranks split the pool (one process, ``world_size == 1``, draws
            ``permutation(seed, epoch)`` of the whole pool either way, bit-identical to before this option):

            - ``"order"`` (default): every rank draws the same epoch order ``permutation(seed, epoch)``
              of the whole pool (padded by repeating its head to a multiple of ``world_size``, as
              ``DistributedSampler``) and takes ``order[rank::world_size]``: disjoint slices, so one step
              of B per rank sees the same volumes (and windows: they are seeded by the *global* position)
              as one process with ``world_size * B``. But each epoch reshuffles the whole pool, so every
              rank eventually draws (and caches) every volume.
            - ``"pool"``: a fixed partition, :func:`shard_indices`: the pool permuted once by ``seed``,
              padded as above, and cut ``[rank::world_size]``; each rank permutes only its part every
              epoch (``part[permutation(seed, epoch)]``). A rank thus draws (and caches) only
              ``ceil(N / world_size)`` volumes for the whole run: the choice for pools that do not fit in
              every rank's RAM. The global batch is no longer the one-process batch (each rank's epoch
              mixes only its part), and resuming needs the same ``world_size``.

            ``(epoch, position)`` is the whole (per-rank) data state in both modes.
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        source_size: Sequence[int] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shard: str = "order",
    ) -> None:
        if len(dataset) == 0:
            raise MedsslError("empty pretraining dataset")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.source_size = tuple(int(r) for r in source_size) if source_size is not None else None
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shard = shard
        self.indices = shard_indices(len(dataset), self.seed, self.rank, self.world_size, shard)
        self.epoch, self.position = 0, 0
        self.skipped: dict[int, str] = {}
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.shard == "pool":  # world_size 1: indices = arange(N), so this is the "order" permutation
            return self.indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        if self.world_size == 1:
            return order
        pad = -len(order) % self.world_size
        order = np.concatenate([order, np.resize(order, pad)]) if pad else order
        return order[self.rank :: self.world_size]

    def _advance(self) -> tuple[int, int, int]:
        """Return ``(index, epoch, global position)`` of the next sample and move the cursor."""
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx, epoch = int(self._order[self.position]), self.epoch
        pos = self.position * self.world_size + self.rank  # position in the unsharded epoch order
        self.position += 1
        return idx, epoch, pos

    def _fetch(self, idx: int) -> torch.Tensor | None:
        if idx in self.skipped:
            return None
        try:
            item = self.dataset[idx]
            reason = item.get(_ERROR_KEY) if isinstance(item, dict) else None
            image = None if reason else item["image"]
        except Exception as e:  # noqa: BLE001 - a non-cached item failing at train time is skipped too
            reason, image, item = f"{type(e).__name__}: {_short(e)}", None, None
        if reason:
            path = item.get("image", f"#{idx}") if isinstance(item, dict) else self._path(idx)
            self.skipped[idx] = reason
            log.warning("skipping volume %s: %s", path, reason)
            if len(self.skipped) == len(self.indices):
                where = f" (rank {self.rank}'s shard)" if self.shard == "pool" and self.world_size > 1 else ""
                raise MedsslError(
                    f"every volume of the pretraining pool{where} failed to load; see the warnings above"
                )
            return None
        return torch.as_tensor(image)

    def _path(self, idx: int) -> str:
        data = getattr(self.dataset, "data", None)
        try:
            return str(data[idx].get("image", f"#{idx}")) if data is not None else f"#{idx}"
        except (IndexError, KeyError, AttributeError):
            return f"#{idx}"

    def crop(self, image: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        """Random window of at most ``source_size`` voxels per axis of ``(C, X, Y, Z)`` (a view, no copy);
        axes already within ``source_size`` (or all, when it is ``None``) are kept whole."""
        if self.source_size is None:
            return image
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        sl = []
        for s, r in zip(image.shape[1:], self.source_size, strict=True):
            size = min(s, r)
            start = int(rng.integers(0, s - size + 1))
            sl.append(slice(start, start + size))
        return image[(slice(None), *sl)]

    def next_batch(self, batch_size: int) -> list[torch.Tensor]:
        """The next ``batch_size`` volumes (windows), each ``(C, D_i, H_i, W_i)`` float32 on the CPU.

        Sizes may differ; the batched augmentation pads them (e.g. ``BatchedSSLAugment`` takes a list).
        """
        vols = []
        while len(vols) < batch_size:
            idx, epoch, pos = self._advance()
            image = self._fetch(idx)
            if image is not None:
                vols.append(self.crop(image, epoch, pos).float())
        return vols

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position, "order_seed": self.seed}
        if self.world_size > 1:
            state.update(rank=self.rank, world_size=self.world_size)
            if self.shard != "order":
                state["shard"] = self.shard
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("order_seed", self.seed)) != self.seed:
            log.warning("resuming with data seed %s (checkpoint had %s)", self.seed, state.get("order_seed"))
        if int(state.get("world_size", 1)) != self.world_size:
            log.warning(
                "data position saved with world_size %s restored on world_size %d: the epoch order is "
                "re-sharded, so this epoch's remaining volumes are not exactly those of the saved run",
                state.get("world_size", 1),
                self.world_size,
            )
        saved_shard = state.get("shard", "order") if int(state.get("world_size", 1)) > 1 else self.shard
        if self.world_size > 1 and saved_shard != self.shard:
            log.warning("data position saved with data_shard=%r restored with data_shard=%r: the epoch "
                        "orders differ, this resume is not exact", saved_shard, self.shard)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
