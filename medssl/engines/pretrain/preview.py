"""Augmentation preview: a PNG grid of the views a method is trained on (middle slices), for MLflow;
:func:`augment_preview` draws it from a side data stream without touching the run's RNG or augmentation state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medssl.engines.pretrain.data import CropBatcher
from medssl.engines.runtime import checkpoint as ck

__all__ = ["save_augment_preview", "augment_preview", "PREVIEW_KEYS"]

log = logging.getLogger(__name__)

#: batch keys shown, in column order, when present
PREVIEW_KEYS = ("view1", "view1_mask", "view1_target", "view2", "view2_mask", "view2_target")


def save_augment_preview(batch: dict[str, torch.Tensor], path: str | Path, max_rows: int = 4) -> Path:
    """Write a grid: one row per sample, one column per view key; each cell the middle D slice of channel 0
    (masks in [0, 1]; rotation classes under their views).

    Args:
        batch: SSL batch dict (``view1``, ``view2`` ``(B, C, D, H, W)``; masks ``(B, 1, D, H, W)``; ...).
        path: output ``.png``.
        max_rows: samples shown.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in PREVIEW_KEYS if isinstance(batch.get(k), torch.Tensor) and batch[k].ndim == 5]
    if not keys:
        raise ValueError(f"batch has none of the view keys {PREVIEW_KEYS}; got {sorted(batch)}")
    rows = min(max_rows, batch[keys[0]].shape[0])
    fig = Figure(figsize=(2.2 * len(keys), 2.2 * rows), dpi=80)
    FigureCanvasAgg(fig)
    for r in range(rows):
        for c, key in enumerate(keys):
            vol = batch[key][r, 0].detach().float().cpu()  # (D, H, W)
            ax = fig.add_subplot(rows, len(keys), r * len(keys) + c + 1)
            ax.imshow(
                vol[vol.shape[0] // 2].numpy(),
                cmap="gray",
                vmin=0 if key.endswith("mask") else None,
                vmax=1 if key.endswith("mask") else None,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(key, fontsize=8)
            rot = batch.get(key.split("_")[0] + "_rot")
            if isinstance(rot, torch.Tensor) and key in ("view1", "view2"):
                ax.set_xlabel(f"rotation class {int(rot[r])}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def augment_preview(
    dataset: Any,
    batcher: CropBatcher,
    augment: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]],
    source_size: Any,
    seed: int,
    device: torch.device | str,
    path: str | Path,
) -> Path | None:
    """Write the preview of 4 samples from a side :class:`CropBatcher` (seed ``seed + 1``, ``batcher``'s shard)
    to ``path``; Python/NumPy/torch RNG and the augmentation's state are restored afterwards, so training is
    unaffected. A failure only warns (returns ``None``)."""
    rng, aug = ck.capture_rng(), ck.component_state(augment)
    try:  # same shard: under data_shard="pool" this rank's dataset holds only its part
        side = CropBatcher(dataset, source_size, seed + 1, batcher.rank, batcher.world_size, batcher.shard)
        with torch.no_grad():
            batch = augment([v.to(device) for v in side.next_batch(4)])
        return save_augment_preview(batch, path)
    except Exception as e:  # noqa: BLE001 - a preview must never stop a run
        log.warning("augmentation preview failed: %s", e)
        return None
    finally:
        ck.restore_rng(rng)
        ck.load_component_state(augment, aug)
