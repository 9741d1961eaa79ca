"""A hand-set "model" for geometry tests: a 1×1×1 convolution whose argmax thresholds CT intensity.

After the recipe's ``ct`` normalisation (window [-1000, 1000] HU → [0, 1]) the logits are
``l_k = k·s·v − c_k`` with ``c_1 = s·t1`` and ``c_2 = s·(t1 + t2)``, so the argmax is class 0 below ``t1``,
1 between ``t1`` and ``t2``, 2 above ``t2``: with ``t1 = -100.5 HU`` and ``t2 = 300.5 HU`` that is
background / soft tissue / bone. The expected label map of any CT volume is then known voxel by voxel
(`expected_labels`), which checks predict's geometry (reorientation, inversion, DICOM frame order) exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medssl.deploy.model import DeployModel

T1_HU, T2_HU = -100.5, 300.5  # half-integers: integer HU never ties
CLASS_NAMES = {"0": "background", "1": "soft_tissue", "2": "bone"}


def _v(hu: float) -> float:
    return (hu + 1000.0) / 2000.0


def threshold_model(**prep: Any) -> DeployModel:
    """The threshold network as a `DeployModel` (``prep`` overrides preprocessing keys)."""
    s = 200.0
    net = torch.nn.Conv3d(1, 3, kernel_size=1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, s, 2 * s]).view(3, 1, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -s * _v(T1_HU), -s * (_v(T1_HU) + _v(T2_HU))]))
    net.eval()
    preprocessing = {
        "task": "segmentation", "in_channels": 1, "out_channels": 3, "class_names": dict(CLASS_NAMES),
        "axcodes": "RAS", "target_spacing": None, "normalisation": "ct", "ct_window": [-1000.0, 1000.0],
        "roi_size": [32, 32, 8], "sw_overlap": 0.25, "sw_batch_size": 4, "flip_axes": [],
    } | prep
    return DeployModel(network=net, recipe={"task": "segmentation"}, preprocessing=preprocessing,
                       source="threshold-model")


def expected_labels(hu: np.ndarray) -> np.ndarray:
    """Class of each voxel of a HU array (integer HU never lands on a threshold)."""
    return (hu > T1_HU).astype(np.uint8) + (hu > T2_HU).astype(np.uint8)
