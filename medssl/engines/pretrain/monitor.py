"""Representation monitor: a kNN probe of the encoder's embeddings during pretraining.

Every ``monitor_every`` steps the pretraining engine embeds a small, fixed, labelled *probe set* with the
current encoder and scores a weighted kNN classifier on it, so a user sees whether the representation
learns anything useful before finetuning (lightly's ``KNNClassifier`` callback does this for 2D images;
the weighting is that of InstDisc, Wu et al. CVPR 2018, arXiv:1805.01978, as used by DINO's kNN eval,
Caron et al. ICCV 2021, arXiv:2104.14294).

- **Which cases** (:func:`probe_items`): only cases of the pretraining pool that carry a ``class`` or a
  ``label``, never a case of a datalist section named ``validation``/``test`` nor of a splits file's test
  set or any seed's validation set. Taken in ``sha256("medssl-monitor:" + case_id)`` order (deterministic
  across machines), classification cases round-robin over the classes.
- **Classification** (items with ``class``): one sample per volume, the whole volume through the
  pretraining preprocessing, centre-cropped / zero-padded to ``roi_size``; target = its class.
- **Segmentation** (items with ``label``): ``crops_per_class`` crops of ``roi_size`` per case and class
  present in its label map (background included), each centred on a voxel of that class drawn from an
  RNG seeded by ``sha256(case_id:class)``; target = the class at the crop centre.
- **Scoring** (:func:`knn_scores`): cosine similarity, ``k = min(monitor_k, candidates)`` neighbours,
  votes ``exp(sim / T)`` with ``T = 0.07``, **leave-one-case-out** (a sample is never matched with a
  sample of its own case, which also excludes itself). Accuracy and balanced accuracy (mean per-class
  recall over the classes present).

Cost (``benchmarks/monitor_cost.py``, 2 CPU cores shared with a running study): hippocampus, the
``label_efficiency.yaml`` SegResNet (8 filters) at 32³, 32 cases → 192 crops: build 4.1 s once, one
evaluation 10.6 s vs 3.1 s per pretraining step (batch 8), i.e. 3.4 % at ``monitor_every: 100``;
AdrenalMNIST3D, the ``classification_adrenal.yaml`` ResNet-10 at 24³: 128 cases 7.3 s vs 4.5 s per step
(1.6 % at 100), 32 cases 1.4 s.

The probe set is built once (tensors cached on the CPU). :meth:`RepresentationMonitor.evaluate` runs the
encoder in eval mode under ``no_grad`` and restores every module's train/eval flag and the global RNG
states afterwards, so an exact resume stays exact and training is unchanged by monitoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    BorderPad,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCrop,
    Spacingd,
)

from medssl.engines.pretrain.data import preprocessing
from medssl.engines.runtime import checkpoint as ck
from medssl.errors import MedsslError
from medssl.transforms.preprocess import ORIENTATION_LABELS

__all__ = [
    "ProbeSet",
    "RepresentationMonitor",
    "build_monitor",
    "build_probe_set",
    "embed",
    "knn_scores",
    "probe_items",
]

log = logging.getLogger(__name__)

#: temperature of the kNN vote weights exp(sim / T) (InstDisc / DINO)
KNN_TEMPERATURE = 0.07


@dataclass
class ProbeSet:
    """The cached probe samples.

    Attributes:
        images: ``(N, C, D, H, W)`` float32 on the CPU, each of ``roi_size``.
        targets: ``(N,)`` long, the class of each sample (volume class, or label at the crop centre).
        groups: ``(N,)`` long, index of the sample's case in ``case_ids`` (leave-one-case-out).
        case_ids: the probe cases.
        kind: ``"classification"`` or ``"segmentation"``.
    """

    images: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor
    case_ids: list[str]
    kind: str


def _hash_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _resolve(datalist: Path, path: str) -> str:
    return str(Path(path) if Path(path).is_absolute() else (datalist.parent / path).resolve())


def _held_out(data: dict[str, Any], splits: str | Path | None) -> set[str]:
    """Case ids of datalist sections named like validation/test and of a medssl splits file's test set and
    every seed's validation set."""
    held = {str(it.get("case_id")) for name, sec in data.items() if isinstance(sec, list)
            and ("val" in name.lower() or "test" in name.lower()) for it in sec if isinstance(it, dict)}
    if splits:
        raw = json.loads(Path(splits).read_text())
        if isinstance(raw.get("unlabeled"), dict):  # a medssl splits.json
            from medssl.data.splits_io import load_splits

            sp = load_splits(splits)
            held |= set(sp["test"]).union(*(s["validation"] for s in sp["seeds"].values()))
    return held


def probe_items(
    datalist: str | Path,
    pool: Sequence[dict[str, Any]],
    splits: str | Path | None = None,
    max_cases: int = 32,
) -> tuple[str | None, list[dict[str, Any]]]:
    """Pick the probe cases: labelled cases of the pretraining ``pool``, never validation/test cases.

    Args:
        datalist: the pretraining datalist (paths relative to it).
        pool: the pretraining pool (:func:`~medssl.engines.pretrain.pool.load_pool`); only its ``case_id`` are used.
        splits: the pretraining ``splits.json`` (its test and validation cases are excluded again).
        max_cases: at most this many cases.

    Returns:
        ``(kind, items)`` with ``kind`` ``"classification"`` (items with ``class``), ``"segmentation"``
        (items with ``label``) or ``None`` (no labelled pool case); items ``{"image": abs path | [paths],
        "label"?: abs path, "class"?: int, "case_id"}`` in deterministic hash order.
    """
    datalist = Path(datalist)
    data = json.loads(datalist.read_text())
    allowed = {str(it["case_id"]) for it in pool} - _held_out(data, splits)
    found: dict[str, dict[str, Any]] = {}
    for sec in data.values():
        for it in sec if isinstance(sec, list) else []:
            cid = str(it.get("case_id", "")) if isinstance(it, dict) else ""
            if cid in allowed and cid not in found and ("class" in it or it.get("label")):
                found[cid] = it
    with_class = [it for it in found.values() if "class" in it]
    kind = "classification" if with_class else "segmentation" if found else None
    chosen = sorted(with_class or found.values(), key=lambda it: _hash_key(f"medssl-monitor:{it['case_id']}"))
    if kind == "classification":  # round-robin over classes so small classes are represented
        by_class: dict[int, list[dict[str, Any]]] = {}
        for it in chosen:
            by_class.setdefault(int(it["class"]), []).append(it)
        queues = [by_class[c] for c in sorted(by_class)]
        chosen = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    out = []
    for it in chosen[:max_cases]:
        image = it["image"]
        item = {"case_id": str(it["case_id"]),
                "image": [_resolve(datalist, p) for p in image] if isinstance(image, list) else _resolve(datalist, image)}
        if kind == "classification":
            item["class"] = int(it["class"])
        else:
            item["label"] = _resolve(datalist, it["label"])
        out.append(item)
    return kind, out


def _label_chain(target_spacing: Sequence[float] | None) -> Compose:
    """Label map → ``(1, X, Y, Z)`` on the grid of :func:`~medssl.engines.pretrain.data.preprocessing`'s image."""
    chain: list = [LoadImaged("label", image_only=True), EnsureChannelFirstd("label"),
                   Orientationd("label", axcodes="RAS", labels=ORIENTATION_LABELS)]
    if target_spacing is not None:
        chain.append(Spacingd("label", pixdim=tuple(float(s) for s in target_spacing), mode="nearest"))
    chain.append(EnsureTyped("label", dtype=torch.int64, track_meta=False))
    return Compose(chain)


def _centre_crops(image: torch.Tensor, label: torch.Tensor, roi: Sequence[int], case_id: str,
                  per_class: int) -> tuple[list[torch.Tensor], list[int]]:
    """``per_class`` crops of ``roi`` centred on voxels of each class present in ``label`` ``(1, X, Y, Z)``.

    Hand-written: MONAI's ``RandCropByLabelClassesd`` draws centres from its own RNG stream and shifts
    centres near the border inwards; here each centre is a fixed function of ``(case_id, class)`` and stays
    the crop's centre (the volume is zero-padded by ``roi // 2`` first, MONAI ``BorderPad``).
    """
    half = [int(r) // 2 for r in roi]
    padded = BorderPad(spatial_border=[h for h in half for _ in (0, 1)])(image)  # (C, X+2h, Y+2h, Z+2h)
    crops, targets = [], []
    lab = label[0].numpy()
    for c in np.unique(lab).tolist():
        voxels = np.argwhere(lab == c)  # (V, 3)
        seed = int(_hash_key(f"{case_id}:{c}")[:16], 16)
        picks = np.random.default_rng(seed).choice(len(voxels), size=min(per_class, len(voxels)), replace=False)
        for p in voxels[np.sort(picks)]:
            # voxel p of the volume is p + half in the padded one: the window [p, p + roi) is centred on it
            sl = tuple(slice(int(s), int(s) + int(r)) for s, r in zip(p, roi, strict=True))
            crops.append(torch.as_tensor(padded)[(slice(None), *sl)].clone())
            targets.append(int(c))
    return crops, targets


def build_probe_set(
    kind: str,
    items: Sequence[dict[str, Any]],
    *,
    roi_size: Sequence[int],
    normalisation: str = "robust",
    target_spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    crops_per_class: int = 2,
) -> ProbeSet | None:
    """Load and cut the probe samples once (see the module docstring); unreadable cases are skipped.

    Args:
        kind, items: from :func:`probe_items`.
        roi_size: the pretraining view size ``(D, H, W)`` in voxels (network input).
        normalisation, target_spacing, ct_window: the pretraining preprocessing
            (:func:`~medssl.engines.pretrain.data.preprocessing`).
        crops_per_class: segmentation: crops per class and case.

    Returns:
        The probe set, or ``None`` with a warning when it has fewer than 2 cases or 2 classes.
    """
    image_chain = preprocessing(normalisation, target_spacing, ct_window)
    label_chain = _label_chain(target_spacing) if kind == "segmentation" else None
    fit = ResizeWithPadOrCrop(spatial_size=[int(r) for r in roi_size])
    images, targets, groups, case_ids = [], [], [], []
    for it in items:
        try:
            image = torch.as_tensor(image_chain({"image": it["image"]})["image"])  # (C, X, Y, Z)
            if label_chain is None:
                crops, ys = [torch.as_tensor(fit(image))], [int(it["class"])]
            else:
                label = torch.as_tensor(label_chain({"label": it["label"]})["label"])  # (1, X, Y, Z)
                if label.shape[1:] != image.shape[1:]:
                    raise MedsslError(f"label shape {tuple(label.shape[1:])} != image shape {tuple(image.shape[1:])}")
                crops, ys = _centre_crops(image, label, roi_size, it["case_id"], crops_per_class)
        except Exception as e:  # noqa: BLE001 - one unreadable case must not stop pretraining
            log.warning("representation monitor: skipping case %s: %s", it["case_id"], e)
            continue
        images += crops
        targets += ys
        groups += [len(case_ids)] * len(crops)
        case_ids.append(it["case_id"])
    if len(case_ids) < 2 or len(set(targets)) < 2:
        log.warning("representation monitor off: %d probe case(s) with %d class(es) (need >= 2 of each)",
                    len(case_ids), len(set(targets)))
        return None
    return ProbeSet(torch.stack(images).float(), torch.tensor(targets), torch.tensor(groups), case_ids, kind)


def embed(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
          batch_size: int = 8) -> torch.Tensor:
    """Encoder embeddings ``(N, E)`` float32 on the CPU of ``images`` ``(N, C, D, H, W)``, in chunks,
    under ``no_grad`` (the caller sets eval mode). A feature map output ``(N, E, …)`` is averaged."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            z = encoder(images[start : start + batch_size].to(device))
            z = z.flatten(2).mean(-1) if z.ndim > 2 else z  # (B, E)
            out.append(z.float().cpu())
    return torch.cat(out)


def knn_scores(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """Leave-one-case-out weighted kNN accuracy of ``embeddings`` ``(N, E)``.

    Each sample votes with its ``k`` most cosine-similar samples of *other* cases (``groups`` ``(N,)``);
    neighbour j adds ``exp(sim_ij / temperature)`` to class ``targets[j]``; the prediction is the arg max.

    Returns:
        ``{"knn_acc", "knn_balanced_acc", "knn_k"}``; balanced accuracy = mean recall over the classes
        present in ``targets``. E.g. two well separated classes → 1.0 and 1.0.

    Raises:
        MedsslError: fewer than 2 cases (no neighbour left).
    """
    targets, groups = targets.long(), groups.long()
    z = F.normalize(embeddings.float(), dim=1)  # (N, E) unit vectors
    sim = z @ z.T  # (N, N) cosine similarity
    same = groups[:, None] == groups[None, :]  # (N, N), diagonal included
    candidates = int((~same).sum(dim=1).min())
    if candidates < 1:
        raise MedsslError("kNN probe needs samples of at least 2 cases (leave-one-case-out)")
    k = min(int(k), candidates)
    top, idx = sim.masked_fill(same, float("-inf")).topk(k, dim=1)  # (N, k)
    weights = (top / temperature).exp()  # (N, k)
    num_classes = int(targets.max()) + 1
    votes = torch.zeros(len(z), num_classes).scatter_add_(1, targets[idx], weights)  # (N, classes)
    correct = (votes.argmax(dim=1) == targets).float()
    recalls = [float(correct[targets == c].mean()) for c in targets.unique().tolist()]
    return {"knn_acc": float(correct.mean()), "knn_balanced_acc": float(np.mean(recalls)), "knn_k": float(k)}


class RepresentationMonitor:
    """Scores an encoder's embeddings of a fixed :class:`ProbeSet` (built once).

    Args:
        probe: the probe set.
        k: kNN neighbours (capped by the leave-one-case-out candidates).
        device: where the encoder runs.
        batch_size: samples per encoder forward.
    """

    def __init__(self, probe: ProbeSet, k: int = 20, device: torch.device | str = "cpu", batch_size: int = 8) -> None:
        self.probe, self.k, self.device, self.batch_size = probe, int(k), torch.device(device), int(batch_size)

    def describe(self) -> dict[str, Any]:
        """``{"kind", "cases", "samples", "classes"}`` of the probe set (for logs and MLflow params)."""
        p = self.probe
        return {"kind": p.kind, "cases": len(p.case_ids), "samples": len(p.targets),
                "classes": sorted(set(p.targets.tolist()))}

    def evaluate(self, encoder: torch.nn.Module) -> dict[str, float]:
        """``{"monitor/knn_acc", "monitor/knn_balanced_acc", "monitor/seconds"}`` of ``encoder`` now.

        The encoder runs in eval mode under ``no_grad``; each module's train flag and the Python/NumPy/torch
        RNG states are restored afterwards (training continues exactly as without the monitor).
        """
        t0 = time.perf_counter()
        rng, modes = ck.capture_rng(), [(m, m.training) for m in encoder.modules()]
        try:
            encoder.eval()
            z = embed(encoder, self.probe.images, self.device, self.batch_size)
        finally:
            for m, flag in modes:
                m.training = flag
            ck.restore_rng(rng)
        scores = knn_scores(z, self.probe.targets, self.probe.groups, self.k)
        return {"monitor/knn_acc": scores["knn_acc"], "monitor/knn_balanced_acc": scores["knn_balanced_acc"],
                "monitor/seconds": time.perf_counter() - t0}


def build_monitor(config: Any, pool: Sequence[dict[str, Any]], device: torch.device | str = "cpu",
                  crops_per_class: int = 2) -> RepresentationMonitor | None:
    """The monitor of a :class:`~medssl.config.PretrainConfig` (``monitor_cases``, ``monitor_k``, roi and
    preprocessing) on its ``pool``; ``None`` (warned) when the pool has too few labelled cases. The global
    RNG states are left untouched."""
    rng = ck.capture_rng()
    try:
        kind, items = probe_items(config.datalist, pool, config.splits, config.monitor_cases)
        if kind is None:
            log.warning("representation monitor off: no case of the pretraining pool has a class or a label")
            return None
        probe = build_probe_set(kind, items, roi_size=config.roi_size, normalisation=config.normalisation,
                                target_spacing=config.target_spacing, ct_window=config.ct_window,
                                crops_per_class=crops_per_class)
    finally:
        ck.restore_rng(rng)
    if probe is None:
        return None
    monitor = RepresentationMonitor(probe, config.monitor_k, device)
    log.info("representation monitor: %s", monitor.describe())
    return monitor
