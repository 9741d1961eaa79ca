"""Finetuning data: the cases of one (fraction, seed) from ``splits.json``, MONAI transforms, datasets.

Preprocessing is the one chain of :mod:`medssl.transforms.preprocess` (also pretraining's and inference's)
extended to the label: load → channel first → RAS → optional resampling (image bilinear, label nearest, mm) →
intensity normalisation (``NormalizeIntensityRobustd`` / HU window) → float32. Training adds random crops
(``RandCropByPosNegLabeld`` or per-class ``RandCropByLabelClassesd``, segmentation) or pad/crop to ``roi_size`` (classification) and the configured
augmentation (:mod:`medssl.engines.finetune.augment`). A multi-channel item (``"image": [path, ...]``, fixed
channel order) is loaded as one ``(C, X, Y, Z)`` volume. With ``target_spacing``, evaluation items also carry
``native_label``: the label on its original grid (RAS-oriented, never resampled) for native-grid metrics.

Exact resume: :func:`seed_epoch` re-seeds the random transforms from ``(seed, epoch)`` and
:func:`epoch_loader` draws the order from the same pair, so an epoch's batches depend on nothing else
(with ``num_workers=0``; worker processes seed themselves from torch's RNG).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose

from medssl.data.splits import fraction_key, load_splits
from medssl.engines.finetune.augment import augment_transforms, crop_transforms
from medssl.engines.pretrain.pool import pool_channels, pool_fingerprint
from medssl.errors import MedsslError
from medssl.transforms.preprocess import preprocess_transforms

__all__ = [
    "datalist_by_case",
    "finetune_items",
    "planning_items",
    "class_weights",
    "eval_transforms",
    "train_transforms",
    "make_dataset",
    "seed_epoch",
    "epoch_loader",
    "run_length",
    "items_hash",
    "data_channels",
    "run_items",
]

log = logging.getLogger(__name__)

_ROLES = ("training", "validation", "test")


def _resolve(path: str | list[str], root: Path) -> str | list[str]:
    if isinstance(path, (list, tuple)):  # a multi-channel item: one file per channel, order kept
        return [str(_resolve(p, root)) for p in path]
    return str(Path(path) if Path(path).is_absolute() else (root / path).resolve())


def datalist_by_case(datalist: str | Path) -> dict[str, dict[str, Any]]:
    """The items of a datalist keyed by ``case_id``, from every section that is a list (``training``,
    ``validation``, ``test``, ``unlabeled``, ...); a case listed twice keeps its first item. The one lookup behind
    :func:`finetune_items`, :func:`planning_items` and the self-training pool
    (:class:`~medssl.engines.finetune.pseudo.PseudoLabels`).

    Raises:
        MedsslError: the file cannot be read or is not JSON.
    """
    datalist = Path(datalist)
    try:
        data = json.loads(datalist.read_text())
    except (OSError, ValueError) as e:
        raise MedsslError(f"cannot read datalist {datalist}: {e}") from e
    by_id: dict[str, dict[str, Any]] = {}
    for entries in data.values() if isinstance(data, dict) else []:
        for it in entries if isinstance(entries, list) else []:
            if isinstance(it, dict) and "case_id" in it:
                by_id.setdefault(it["case_id"], it)
    return by_id


def finetune_items(
    datalist: str | Path,
    splits: str | Path,
    *,
    fraction: float,
    seed: int,
    task: str = "segmentation",
    class_key: str = "class",
    num_classes: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The labelled cases of one run: ``training`` = the seed's fraction, ``validation`` = the seed's
    validation set, ``test`` = the fixed test set.

    Args:
        datalist: MONAI datalist JSON; relative paths are resolved against its folder.
        splits: ``splits.json`` (:mod:`medssl.data.splits`).
        fraction: percent, a key of ``splits["seeds"][seed]["fractions"]`` (e.g. ``10``).
        seed: split seed.
        task: ``"segmentation"`` (items need ``label`` paths) or ``"classification"`` (items need
            ``class_key``).
        class_key: datalist key holding the class index (classification).
        num_classes: expected classes ``0..K-1`` (classification); default: the classes seen in the data.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``; segmentation items
        ``{"image": abs path, "label": abs path, "case_id"}``, classification items
        ``{"image": abs path, "label": int class, "case_id"}``; a multi-channel ``image`` stays a list of
        absolute paths (channel order kept).

    Raises:
        MedsslError: unknown seed / fraction (the available ones named), case ids of the splits missing from
            the datalist, items without label, a class index outside ``0..K-1``, or a fraction that leaves a
            class without training cases (fraction and class named).
    """
    datalist = Path(datalist)
    by_id = datalist_by_case(datalist)
    sp = load_splits(splits)
    s = sp["seeds"].get(str(seed))
    if s is None:
        raise MedsslError(f"seed {seed} is not in {splits} (seeds: {sorted(sp['seeds'])})")
    fkey = fraction_key(fraction)
    if fkey not in s["fractions"]:
        raise MedsslError(
            f"fraction {fkey} % is not in {splits} for seed {seed} (fractions: {sorted(s['fractions'], key=float)})"
        )
    ids = {"training": s["fractions"][fkey], "validation": s["validation"], "test": sp["test"]}
    out: dict[str, list[dict[str, Any]]] = {}
    for role in _ROLES:
        missing = [c for c in ids[role] if c not in by_id]
        if missing:
            raise MedsslError(
                f"{len(missing)} {role} case(s) of {splits} are not in {datalist} (e.g. {missing[:3]}); "
                "were the splits made from another datalist?"
            )
        out[role] = [_item(by_id[c], datalist.parent, task, class_key, role) for c in ids[role]]
    if not out["training"]:
        raise MedsslError(f"fraction {fkey} % of seed {seed} holds no training case")
    if task == "classification":
        _check_classes(out, fkey, num_classes)
    log.info("fraction %s %%, seed %d: %s cases", fkey, seed, {r: len(v) for r, v in out.items()})
    return out


def run_items(config: Any) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The items of one finetuning run (:func:`finetune_items` of ``config``'s datalist, splits, fraction, seed,
    task) and their image channel count.

    Raises:
        MedsslError: as :func:`finetune_items`, or ``config.in_channels`` set and not the data's channel count.
    """
    seg = config.task == "segmentation"
    items = finetune_items(
        config.datalist, config.splits, fraction=config.fraction, seed=config.seed, task=config.task,
        class_key=config.class_key, num_classes=None if seg else config.num_classes,
    )  # fmt: skip
    channels = data_channels(items)
    if config.in_channels is not None and int(config.in_channels) != channels:
        raise MedsslError(
            f"in_channels={config.in_channels} but the items of {config.datalist} have {channels} image channel(s)"
        )
    return items, channels


def planning_items(datalist: str | Path, splits: str | Path) -> list[dict[str, Any]]:
    """The labelled cases a recipe is planned from (:mod:`medssl.engines.finetune.planner`): every seed's validation
    set and largest fraction, never the fixed test set, so every fraction and seed of a study gets one plan.

    Returns:
        Segmentation items ``{"image", "label", "case_id"}`` (absolute paths), sorted by case id.

    Raises:
        MedsslError: an unreadable datalist, case ids missing from it, items without ``label``.
    """
    datalist = Path(datalist)
    by_id = datalist_by_case(datalist)
    sp = load_splits(splits)
    ids: set[str] = set()
    for s in sp["seeds"].values():
        largest = max(s["fractions"], key=float) if s["fractions"] else None
        ids |= set(s["validation"]) | set(s["fractions"].get(largest, []) if largest else [])
    ids -= set(sp["test"])
    missing = sorted(ids - set(by_id))
    if missing:
        raise MedsslError(f"{len(missing)} case(s) of {splits} are not in {datalist} (e.g. {missing[:3]})")
    return [_item(by_id[c], datalist.parent, "segmentation", "class", "planning") for c in sorted(ids)]


def _item(it: dict[str, Any], root: Path, task: str, class_key: str, role: str) -> dict[str, Any]:
    case = it["case_id"]
    if task == "segmentation":
        if not it.get("label"):
            raise MedsslError(f"{role} case {case} has no 'label' (segmentation needs label maps)")
        out = {"image": _resolve(it["image"], root), "label": _resolve(it["label"], root), "case_id": case}
    elif it.get(class_key) is None:
        raise MedsslError(f"{role} case {case} has no '{class_key}' (classification needs a class per item)")
    else:
        out = {"image": _resolve(it["image"], root), "label": int(it[class_key]), "case_id": case}
    if it.get("channels"):
        out["channels"] = list(it["channels"])  # channel names (their count is the network's in_channels)
    return out


def _check_classes(out: dict[str, list[dict[str, Any]]], fkey: str, num_classes: int | None) -> None:
    seen = {it["label"] for items in out.values() for it in items}
    k = num_classes if num_classes is not None else max(seen) + 1
    bad = sorted(c for c in seen if not 0 <= c < k)
    if bad:
        raise MedsslError(f"class index(es) {bad} outside 0..{k - 1} (num_classes={k})")
    train = Counter(it["label"] for it in out["training"])
    empty = [c for c in range(k) if train[c] == 0]
    if empty:
        raise MedsslError(
            f"fraction {fkey} % leaves class(es) {empty} without training cases "
            f"(training class counts: {dict(sorted(train.items()))}); use a larger fraction or stratified splits"
        )


def data_channels(items: dict[str, list[dict[str, Any]]] | Sequence[dict[str, Any]]) -> int:
    """Input channels of the items, equal for all (:func:`medssl.engines.pretrain.pool.pool_channels`: the
    ``channels`` list when present, e.g. an MSD 4D file, else ``len(image)`` of a list of channel files, else 1).

    Raises:
        MedsslError: items with different channel counts (one case of each count named).
    """
    flat = [it for v in items.values() for it in v] if isinstance(items, dict) else list(items)
    return pool_channels(flat, "the finetuning cases")


def class_weights(items: Sequence[dict[str, Any]], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (K * n_c)`` of the training items (mean weight per case 1).

    Example: 9 cases of class 0 and 3 of class 1 → ``[0.667, 2.0]``.
    """
    counts = Counter(int(it["label"]) for it in items)
    n = sum(counts.values())
    return torch.tensor(
        [n / (num_classes * max(counts[c], 1)) for c in range(num_classes)], dtype=torch.float32
    )


def eval_transforms(
    task: str,
    *,
    normalisation: str = "robust",
    target_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    roi_size: Sequence[int] = (32, 32, 32),
    native_label: bool = False,
) -> Compose:
    """Deterministic chain for validation / test (and the cached head of the training chain): the one
    preprocessing chain, :func:`medssl.transforms.preprocess.preprocess_transforms`, of these settings.

    Segmentation maps ``{"image", "label"}`` paths to ``MetaTensor (C, X, Y, Z)`` / ``(1, X, Y, Z)`` (image
    float32 in the normalised range, label float32 class indices; meta kept for the voxel spacing of HD95).
    Classification maps ``{"image"}`` to ``(C, *roi_size)`` (padded / centre-cropped), the int ``label`` is
    left as is.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        normalisation: ``"robust"``, ``"ct"`` or ``"none"`` (pretraining's).
        target_spacing: voxel size in mm ``(x, y, z)``; ``None`` keeps the native grid.
        ct_window: HU window for ``"ct"``.
        roi_size: classification input size ``(D, H, W)`` in voxels.
        native_label: segmentation with ``target_spacing``: also keep ``native_label``, the label before
            resampling ``(1, X0, Y0, Z0)`` with its own affine (evaluation in the label's native grid).
    """
    prep = {
        "task": task,
        "axcodes": "RAS",
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
        "normalisation": normalisation,
        "ct_window": [float(v) for v in ct_window],
        "roi_size": [int(r) for r in roi_size],
    }
    label = "label" if task == "segmentation" else None
    return preprocess_transforms(prep, label_key=label, native_label=native_label)


def train_transforms(
    task: str,
    *,
    roi_size: Sequence[int],
    num_samples: int = 2,
    normalisation: str = "robust",
    target_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    augment: dict[str, Any] | None = None,
    sampling: str = "posneg",
    num_classes: int | None = None,
    class_ratios: Sequence[float] | None = None,
) -> Compose:
    """:func:`eval_transforms` + random training transforms (arguments as there).

    Segmentation: pad to ``roi_size``, ``num_samples`` crops of ``roi_size`` per volume
    (:func:`~medssl.engines.finetune.augment.crop_transforms`: ``sampling`` ``"posneg"`` = foreground /
    background centres 1:1, ``"classes"`` = per-class centres with ``class_ratios`` over ``num_classes``,
    ``"whole"`` = the padded volume itself), then ``augment``. Classification: ``augment`` of the padded /
    cropped volume. ``augment``: :func:`~medssl.engines.finetune.augment.resolve_augment` keys; ``None`` = the
    defaults (random flips of each axis, p = 0.5).
    """
    roi = tuple(int(r) for r in roi_size)
    det = eval_transforms(
        task, normalisation=normalisation, target_spacing=target_spacing, ct_window=ct_window, roi_size=roi
    )
    keys = ["image", "label"] if task == "segmentation" else ["image"]
    rand: list = []
    if task == "segmentation":
        rand += crop_transforms(keys, roi, sampling=sampling, num_samples=num_samples, num_classes=num_classes,
                                ratios=class_ratios)
    rand += augment_transforms(keys, augment)
    return Compose([*det.transforms, *rand])


def make_dataset(
    items: Sequence[dict[str, Any]], transform: Compose, cache_rate: float = 1.0, num_workers: int = 0
) -> CacheDataset:
    """``CacheDataset`` holding the deterministic part of ``transform`` for ``cache_rate`` of the items."""
    return CacheDataset(
        list(items),
        transform,
        cache_rate=cache_rate,
        num_workers=max(1, num_workers),
        progress=False,
        copy_cache=True,
    )


def _derive(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.default_rng([int(seed), int(epoch), stream]).integers(0, 2**31 - 1))


def seed_epoch(dataset: CacheDataset, seed: int, epoch: int) -> None:
    """Seed every random transform of ``dataset`` from ``(seed, epoch)`` (before each training epoch)."""
    dataset.transform.set_random_state(seed=_derive(seed, epoch, 1))


def epoch_loader(
    dataset: CacheDataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0
) -> DataLoader:
    """Shuffled MONAI ``DataLoader`` whose order is a function of ``(seed, epoch)``; crops of one volume are
    flattened into the batch (``list_data_collate``): ``(batch_size * num_samples, C, D, H, W)``."""
    gen = torch.Generator().manual_seed(_derive(seed, epoch, 2))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers)


def run_length(epoch_items: int, batch_size: int, max_steps: int, max_epochs: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of a run whose epoch holds ``epoch_items`` items (self-training: the
    repeated labelled cases and the pseudo-labelled ones): ``max_steps`` when set, else ``max_epochs`` epochs.
    The one definition of the run's length (:class:`~medssl.engines.finetune.engine.Finetuner` and
    :func:`~medssl.engines.finetune.estimate.run_counts`). Example: 266 items, batch 4, max_steps 2,400 → (67, 2400).
    """
    steps_per_epoch = math.ceil(epoch_items / int(batch_size))
    return steps_per_epoch, int(max_steps or max_epochs * steps_per_epoch)


def items_hash(items: Sequence[dict[str, Any]]) -> str:
    """Short sha256 over case ids and image file sizes (identifies the data without reading it); the same
    fingerprint as the pretraining pool's (:func:`medssl.engines.pretrain.pool.pool_fingerprint`)."""
    return pool_fingerprint(list(items))
