"""Run configurations: plain dataclasses, loadable from YAML plus dotted ``key=value`` overrides.

A config is data only (no objects): it round-trips through ``to_dict`` / ``from_dict``, is logged to
MLflow as flattened params and embedded in every checkpoint.

Example::

    cfg = PretrainConfig.from_yaml("pretrain.yaml", overrides=["lr=3e-4", "method_kwargs.temperature=0.2"])
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl.errors import MedsslError

__all__ = ["ConfigBase", "PretrainConfig", "flatten_dict", "apply_overrides"]

log = logging.getLogger(__name__)

_AMP = (None, "bf16", "fp16")
_NORM = ("robust", "ct", "none")


class ConfigBase:
    """(De)serialisation shared by the run configs (dataclasses of plain values): dict/YAML round trips
    with dotted overrides, unknown keys named with the valid ones, invalid values as `MedsslError`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | dict[str, Any] | None = None):
        """Build from a dict, then apply dotted overrides (``["lr=1e-3", "method_kwargs.tau=0.1"]``).

        Raises:
            MedsslError: unknown keys (named, with the valid ones) or invalid values.
        """
        data = apply_overrides(dict(data), overrides or [])
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise MedsslError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise MedsslError(f"invalid {cls.__name__}: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | dict[str, Any] | None = None):
        """Load a YAML mapping of config fields, then apply dotted overrides."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MedsslError(f"cannot read config {path}: {e}") from e
        if not isinstance(data, dict):
            raise MedsslError(f"config {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data, overrides)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of :meth:`to_dict`; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class PretrainConfig(ConfigBase):
    """Everything `medssl pretrain` needs; every field is a plain JSON/YAML value.

    Args:
        datalist: MONAI datalist JSON (``medssl ingest`` output); paths inside are relative to it.
        sections: datalist sections forming the unlabelled pool (labels, if any, are ignored).
        splits: optional ``splits.json`` (``medssl split``); the pool is then its study-wide
            ``pretrain_pool`` (every case outside the test set and every seed's validation set, patient
            groups included), from any section, so the encoder serves every seed of the study.
        split_seed: ``None`` (default): the study-wide pool; a seed: that seed's ``unlabeled`` pool only
            (it holds the other seeds' validation cases: finetuning those seeds fails the leakage check).
        method: SSL method name (``medssl.methods``) or ``"package.module:callable"``.
        method_kwargs: extra constructor arguments of the method.
        encoder: encoder name (``medssl.networks.encoders``) or ``"package.module:callable"``.
        encoder_kwargs: extra constructor arguments of the encoder.
        augment: ``None`` (the method's default batched on-device augmentation) or ``"module:callable"``.
        augment_kwargs: overrides passed to the augmentation factory.
        in_channels: image channels C; ``None`` (default): the pool's channel count (files per
            ``"image"`` list of a multi-channel datalist, else 1). A value contradicting the data is an error.
        roi_size: view size ``(D, H, W)`` in voxels produced by the augmentation (network input).
        source_size: largest window ``(D, H, W)`` of a cached volume handed to the augmentation, which
            draws the views inside it; ``None`` hands whole volumes (small MRI). E.g. ``[96, 96, 96]`` for CT.
        target_spacing: resample to this voxel size in mm ``(x, y, z)``; ``None`` keeps the native grid.
        normalisation: ``"robust"`` (per-volume percentile scaling, MRI), ``"ct"`` (HU window) or ``"none"``.
        ct_window: HU window ``(min, max)`` mapped to [0, 1] for ``normalisation="ct"``.
        batch_size: volumes per micro-batch B; one optimizer step sees ``batch_size * grad_accum`` volumes.
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate (after warm-up).
        min_lr: final learning rate of the cosine decay.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length in optimizer steps.
        total_steps: optimizer steps; if 0, derived from ``epochs``.
        epochs: passes over the pool, used only when ``total_steps == 0``.
        grad_clip: max global grad norm (``None``/0 disables clipping).
        amp: ``"bf16"``, ``"fp16"`` or ``None``; ignored (with a warning) on CPU.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        seed: seed of model init, data order, crops and augmentation.
        deterministic: ``torch.use_deterministic_algorithms(True)`` during the run.
        checkpoint_every: write ``step_XXXXXXX.pt`` (and ``last.pt``) every N steps; 0 = only at the end.
        keep_checkpoints: periodic checkpoints kept (oldest deleted); ``last.pt`` is always kept.
        out_dir: run folder (checkpoints, ``metrics.jsonl``, ``encoder.pt``/``.json``, config YAML).
        cache_rate: share of volumes kept in the in-memory ``CacheDataset`` (filled lazily).
        num_workers: threads for loading; 0 (default) loads in the training process, which was
            faster than workers for small volumes on 2 CPU cores.
        cache: where the preprocessed pool lives (:mod:`medssl.engines.pretrain.pool_cache`): ``"ram"`` (default,
            in-memory cache), ``"disk"`` (a MONAI ``PersistentDataset`` in ``cache_dir``, built once and shared
            by ranks and runs, keyed by preprocessing recipe and file; memory flat in the pool size) or
            ``"none"`` (preprocess at every draw).
        cache_dir: the disk cache's folder (``cache="disk"`` only), e.g. a shared ``/scratch/medssl-cache``.
        data_shard: how DDP ranks split the pool (:class:`~medssl.engines.pretrain.data.CropBatcher`): ``"order"``
            (default: each epoch's global order, 2 ranks × B = 1 process × 2B, but every rank draws every
            volume) or ``"pool"`` (a fixed seeded partition: each rank draws and caches only its
            ``N / world_size`` volumes). One process is unaffected.
        sync_batchnorm: under DDP (``torchrun``, ``WORLD_SIZE > 1``), convert BatchNorm layers to
            ``SyncBatchNorm`` (batch statistics over the global batch; CUDA only, ignored with a warning
            on CPU/Gloo).
        ddp_find_unused_parameters: DDP's ``find_unused_parameters`` (methods whose forward leaves some
            trainable parameters unused, e.g. an inactive task head, need it; costs one graph walk).
        channels_last: run the model and its 5-D inputs in ``torch.channels_last_3d`` memory format.
            ``None`` (auto): on for fp32 CPU runs, where it was measured 1.2–1.7× faster for the CNN
            encoders and neutral for SwinViT with equal losses (``benchmarks/RESULTS.md``); off
            on CUDA (not measured) and with ``cpu_bf16`` (slower there for SegResNet).
        compile: wrap the model in ``torch.compile`` (opt-in; the first steps pay the compile time).
        cpu_bf16: bf16 autocast on the CPU, only where the CPU has native bf16 (AVX512-BF16 / AMX);
            otherwise ignored with a warning. CUDA uses ``amp``.
        num_threads: ``torch.set_num_threads`` for the run (0 keeps torch's default: one per core, or
            ``OMP_NUM_THREADS``, which ``torchrun`` sets to 1 per process).
        max_nan_steps: K; this many non-finite losses in a row abort the run.
        log_every: metrics are logged every N steps.
        preview: log an augmentation preview PNG at the start.
        monitor_every: representation monitor (:mod:`medssl.engines.pretrain.monitor`): every N optimizer steps (and
            at step 0 of a fresh run) score a leave-one-case-out kNN probe of the encoder's embeddings of a
            few labelled cases of the pretraining pool (never validation/test cases), logged as
            ``monitor/knn_acc``, ``monitor/knn_balanced_acc``, ``monitor/seconds``; 0 (default) = off.
        monitor_cases: at most this many probe cases (classification: one embedding per volume;
            segmentation: crops centred on each class of each case).
        monitor_k: kNN neighbours (capped by the number of samples of other cases).
        experiment: MLflow experiment name; ``None`` disables MLflow tracking.
        run_name: MLflow run name (default: the out dir name).
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``).
        parent_run_id: MLflow parent run (sweeps).
        tags: extra MLflow tags.
    """

    datalist: str = ""
    sections: list[str] = field(default_factory=lambda: ["unlabeled", "training"])
    splits: str | None = None
    split_seed: int | None = None
    method: str = "simclr"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder: str = "swinvit"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: str | None = None
    augment_kwargs: dict[str, Any] = field(default_factory=dict)
    in_channels: int | None = None
    roi_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    source_size: list[int] | None = None
    target_spacing: list[float] | None = None
    normalisation: str = "robust"
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 0
    total_steps: int = 100
    epochs: int = 0
    grad_clip: float | None = 1.0
    amp: str | None = None
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs/pretrain"
    cache_rate: float = 1.0
    num_workers: int = 0
    cache: str = "ram"
    cache_dir: str | None = None
    data_shard: str = "order"
    sync_batchnorm: bool = False
    ddp_find_unused_parameters: bool = True
    channels_last: bool | None = None
    compile: bool = False
    cpu_bf16: bool = False
    num_threads: int = 0
    max_nan_steps: int = 5
    log_every: int = 1
    preview: bool = True
    monitor_every: int = 0
    monitor_cases: int = 32
    monitor_k: int = 20
    experiment: str | None = "medssl-pretrain"
    run_name: str | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # 32 → [32, 32, 32], tuples → lists (YAML and Python callers write both)
        for name in ("roi_size", "source_size", "target_spacing", "sections"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) and name != "sections":
                setattr(self, name, [v] * 3)
            elif isinstance(v, tuple):
                setattr(self, name, list(v))
        if isinstance(self.sections, str):
            self.sections = [self.sections]
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raises ``ValueError`` naming the field and value."""
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {_AMP}, got {self.amp!r}")
        if self.normalisation not in _NORM:
            raise ValueError(f"normalisation must be one of {_NORM}, got {self.normalisation!r}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive ints (D, H, W), got {self.roi_size!r}")
        if self.source_size is not None and (len(self.source_size) != 3 or min(self.source_size) < 1):
            raise ValueError(
                f"source_size must be 3 positive ints (D, H, W) or None, got {self.source_size!r}"
            )
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or min(self.target_spacing) <= 0
        ):
            raise ValueError(f"target_spacing must be 3 positive mm values, got {self.target_spacing!r}")
        for name in ("batch_size", "grad_accum", "max_nan_steps", "log_every", "in_channels"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        nonneg = ("total_steps", "epochs", "warmup_steps", "checkpoint_every", "num_workers", "num_threads",
                  "monitor_every")
        for name in nonneg:
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if int(self.monitor_cases) < 2 or int(self.monitor_k) < 1:
            raise ValueError(
                f"monitor_cases must be >= 2 and monitor_k >= 1, got {self.monitor_cases!r}, {self.monitor_k!r}"
            )
        if self.total_steps == 0 and self.epochs == 0:
            raise ValueError("set total_steps or epochs (both are 0)")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {self.cache_rate!r}")
        if self.cache not in ("ram", "disk", "none") or self.data_shard not in ("order", "pool"):
            raise ValueError(f"cache must be ram|disk|none and data_shard order|pool, got {self.cache!r}, "
                             f"{self.data_shard!r}")
        if self.cache == "disk" and not self.cache_dir:
            raise ValueError("cache='disk' needs cache_dir (a folder shared by the ranks and runs)")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr > 0, min_lr >= 0, weight_decay >= 0 expected, got {self.lr}, {self.min_lr}, "
                f"{self.weight_decay}"
            )


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; values are parsed as YAML (``1`` → int, ``[1,2]`` → list).

    Args:
        data: nested dict, modified in place and returned.
        overrides: ``["key.sub=value", ...]`` or ``{"key.sub": value}``.

    Raises:
        MedsslError: an override string without ``=``.
    """
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for o in overrides:
            if "=" not in o:
                raise MedsslError(f"override {o!r} must look like key=value (e.g. lr=1e-3)")
            k, v = o.split("=", 1)
            items.append((k.strip(), _parse_value(v)))
    for key, value in items:
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return data


def _parse_value(text: str) -> Any:
    """YAML scalar/list parsing plus ``1e-3`` → float and ``None`` → None (YAML 1.1 reads both as strings)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        if value in ("None", "none"):
            return None
        try:
            return float(value)
        except ValueError:
            return value
    return value


def flatten_dict(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": 1, "c": [1, 2]}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out
