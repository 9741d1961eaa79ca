"""Segmentation metrics in the label's native grid (the convention of MSD / nnU-Net evaluations).

A run with ``target_spacing`` trains and infers on resampled volumes; scoring the prediction on that grid
would compare it with a *resampled* ground truth (nearest-neighbour label resampling adds or drops boundary
voxels) and measure HD95 in the target spacing. Here the network's logits ``(K, X', Y', Z')`` (affine of the
resampled image) are resampled back onto the original label grid with MONAI ``ResampleToMatch`` (bilinear on
logits, then argmax in :class:`~medssl.engines.finetune.metrics.SegmentationMetrics`), and Dice / HD95 are computed
against the label as loaded (``native_label`` of :func:`medssl.engines.finetune.data.eval_transforms`), with
HD95 in the label's own voxel spacing (mm).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from monai.data import DataLoader, MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import ResampleToMatch

from medssl.engines.finetune.metrics import SegmentationMetrics, as_tensor

__all__ = ["to_native_grid", "evaluate_native"]


def to_native_grid(logits: torch.Tensor, image_affine: torch.Tensor, native_label: Any) -> torch.Tensor:
    """Resample one case's logits onto the native label grid.

    Args:
        logits: ``(K, X', Y', Z')`` network output on the resampled grid.
        image_affine: ``(4, 4)`` RAS affine (mm) of that grid (the preprocessed image's).
        native_label: ``MetaTensor (1, X, Y, Z)`` label on its original grid (its affine is the target).

    Returns:
        ``(K, X, Y, Z)`` logits on the label's grid (bilinear).
    """
    src = MetaTensor(logits.float(), affine=torch.as_tensor(image_affine, dtype=torch.float64))
    out = ResampleToMatch(mode="bilinear", padding_mode="border")(src, img_dst=native_label)
    return as_tensor(out)


@torch.no_grad()
def evaluate_native(
    model: torch.nn.Module,
    dataset: Any,
    *,
    num_classes: int,
    inferer: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Dice / HD95 of ``model`` on items ``{"image" (C, X', Y', Z'), "native_label" (1, X, Y, Z)}`` in the
    native label grid (see the module docstring); keys as :meth:`SegmentationMetrics.compute`."""
    model.eval()
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    metrics = SegmentationMetrics(num_classes)
    for batch in DataLoader(dataset, batch_size=1, num_workers=num_workers):
        image, native = batch["image"], batch["native_label"]
        with autocast():
            logits = inferer(as_tensor(image).to(device), model)
        label = native[0]
        native_logits = to_native_grid(logits[0].float().cpu(), image.affine[0], label)
        spacing = affine_to_spacing(label.affine, r=3).tolist()
        metrics.update(native_logits[None], as_tensor(label)[None], spacing)
    return metrics.compute()
