"""Finetuning run configuration: a plain dataclass, loadable from YAML plus dotted ``key=value`` overrides.

Same conventions as :class:`medssl.config.PretrainConfig` (``to_dict`` / ``from_dict`` / ``from_yaml`` /
``validate``); the config is logged to MLflow as flattened params and embedded in every checkpoint.

:func:`medssl.engines.finetune.build.build_model` resolves a config into the network (SSL weights loaded and
reported) and the preprocessing the run must use.

Example::

    cfg = FinetuneConfig.from_yaml("finetune.yaml", overrides=["fraction=10", "init=ssl:runs/pre/encoder.pt"])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from medssl.config import ConfigBase
from medssl.engines.finetune.augment import SAMPLINGS, class_ratios, resolve_augment
from medssl.engines.finetune.pseudo import normalise_self_training
from medssl.engines.runtime.schedules import check_ssl_schedule_options, normalise_ssl_schedule

__all__ = ["FinetuneConfig", "TASKS", "NETWORKS", "SCRATCH_ONLY", "AUTO", "AUTO_FIELDS", "is_auto"]

log = logging.getLogger(__name__)

TASKS = ("segmentation", "classification")
NETWORKS = ("SwinUNETR", "UNETR", "SegResNet", "BasicUNet", "UNet", "ResNet")
#: networks without SSL transfer (scratch only). Empty since the MONAI ``UNet`` takes SparK inits (``monai_unet``)
SCRATCH_ONLY: tuple[str, ...] = ()
#: the value of a field the planner (:mod:`medssl.engines.finetune.plan`) resolves at run start
AUTO = "auto"
#: fields that may be ``"auto"`` (``network_kwargs`` also per key: ``{init_filters: auto}``)
AUTO_FIELDS = ("roi_size", "target_spacing", "batch_size", "num_samples", "out_channels", "network_kwargs")
_AMP = (None, "bf16", "fp16")
_NORM = (None, "robust", "ct", "none")


def is_auto(value: Any) -> bool:
    """``value`` is the planner marker ``"auto"`` (any case)."""
    return isinstance(value, str) and value.strip().lower() == AUTO


@dataclass
class FinetuneConfig(ConfigBase):
    """Everything `medssl finetune` needs; every field is a plain JSON/YAML value.

    Args:
        datalist: MONAI datalist JSON (``medssl ingest`` output); paths inside are relative to it.
        splits: ``splits.json`` of ``medssl split`` (fixed test set, per-seed validation and fractions).
        fraction: labelled training fraction in percent; must be a key of the splits (e.g. ``10``).
        seed: split seed (which validation set / fraction subset) and seed of init, order and augmentation.
        study: study name (MLflow tag ``medssl.study``; sweeps set it).
        init: ``"scratch"`` or ``"ssl:<path | folder | runs:/… | models:/… URI>"`` of an SSL checkpoint.
        task: ``"segmentation"`` or ``"classification"``.
        network: ``"SwinUNETR"``, ``"UNETR"``, ``"SegResNet"``, ``"BasicUNet"`` (segmentation; BasicUNet
            takes a Models Genesis checkpoint, encoder and decoder), ``"UNet"`` (MONAI ``UNet`` with residual
            units; takes a SparK ``monai_unet`` checkpoint, encoder and decoder, only the top up block new) or
            ``"ResNet"`` (classification).
        network_kwargs: from scratch, the encoder family's build arguments (``feature_size``,
            ``init_filters``, ``depth``, BasicUNet ``features`` …; UNet ``channels``, ``strides``,
            ``num_res_units``) plus decoder/head arguments; with SSL init, only arguments not shaping the
            encoder (one equal to the recipe's is accepted, another refused). ``"auto"`` (or a key set to
            ``"auto"``): the planner's widths / depth for UNet or SegResNet (from scratch; with SSL init the
            recipe fixes the encoder and planned keys are dropped: a UNet from ``monai_unet`` gets the
            encoder's ``channels``, ``strides``, ``num_res_units``).
        out_channels: segmentation classes including background (hippocampus: 3); ``"auto"`` = the planner's
            (datalist ``labels`` table, else the values of a few label maps).
        num_classes: classifier classes (AdrenalMNIST3D: 2).
        class_key: datalist item key holding the class (classification).
        roi_size: training crop / sliding-window size ``(D, H, W)`` in voxels; classification volumes are
            padded or cropped to it. ``"auto"`` (segmentation): the planner's patch, the whole median volume
            rounded up to a multiple of the network's total stride when it fits the voxel budget.
        target_spacing: resample to this voxel size in mm ``(x, y, z)``; ``None`` keeps the native grid.
            With SSL init and ``None``, the checkpoint's spacing is used. ``"auto"``: the median spacing of the
            study's labelled cases (nnU-Net's rule for anisotropic data).
        normalisation: ``"robust"``, ``"ct"`` or ``"none"`` (as in pretraining); ``None`` = the SSL recipe's
            (``"robust"`` from scratch). An explicit value contradicting the recipe is refused.
        ct_window: HU window ``(min, max)`` for ``normalisation="ct"``; ``None`` = the recipe's / (-1000, 1000).
        override_preprocessing: accept preprocessing that contradicts the SSL recipe (warned).
        batch_size: volumes per step (segmentation: each contributes ``num_samples`` crops); ``"auto"`` = the
            planner's (voxel-per-step budget), at most the fraction's training cases.
        num_samples: crops per volume per step, segmentation; ``"auto"``: 1 when the planned patch covers the
            median volume, else 2.
        sampling: crop centres, segmentation: ``"posneg"`` (foreground / background 1:1) or ``"classes"``
            (per class with ``class_ratios``: a small class is a centre as often as a large one). When
            ``roi_size`` covers every training volume the volume is only padded (recorded as ``"whole"`` in
            the recipe).
        class_ratios: crop-centre ratio per class incl. background for ``"classes"``; ``None`` = equal.
        planner: options of :func:`medssl.engines.finetune.planner.plan_segmentation` (``patch_voxel_budget``,
            ``step_voxel_budget``, ``base_width`` …); the plan is recorded in the recipe and ``plan.json``.
        augment: random training transforms (:mod:`medssl.engines.finetune.augment`): ``flip_prob``,
            ``flip_axes`` (default all three), ``intensity_scale``, ``intensity_shift``, ``intensity_prob``;
            missing keys take the defaults (flip each axis with p = 0.5). Stored resolved (every key).
        in_channels: input channels; ``None`` = the datalist's channel count (``"image": [paths]`` items are
            multi-channel). An explicit value must match the data and an SSL recipe's.
        lr: peak learning rate (AdamW); ``min_lr``: end of the cosine decay; ``warmup_steps``: linear warm-up.
        weight_decay: AdamW weight decay.
        max_epochs: passes over the training fraction; ``max_steps`` > 0 caps optimizer steps instead
            (the run then ends at the epoch in which it is reached).
        val_every: validate every N epochs (and always after the last epoch).
        val_every_steps: > 0: validate every N optimizer steps instead (``val_every`` ignored), so small and
            large fractions validate equally often; 0 = per ``val_every`` epochs.
        early_stopping_patience: stop after this many validations without improvement; 0 disables.
        sw_batch_size: sliding-window batch size; ``sw_overlap``: window overlap in [0, 1).
        tta: segmentation validation / test with test-time flips along ``augment.flip_axes`` (softmax averaged,
            :mod:`medssl.engines.finetune.tta`), as nnU-Net mirrors at inference; selection and test use the same scoring.
        freeze_encoder: linear probe (encoder parameters not trained).
        llrd: layer-wise lr decay factor in (0, 1] (``None`` = off), every init.
        encoder_warmup_steps: encoder lr held at 0 for this many optimizer steps (encoder only, norms train).
        ssl_schedule: schedule of the pretrained part (encoder + transferred decoder) of an SSL init; scratch
            runs ignore it (:mod:`medssl.engines.runtime.schedules`). ``"none"``: today's single schedule. ``"auto"``:
            frozen (no gradients, norm statistics held as in the linear probe) for 10 % of the steps (>= 20, <= a
            quarter of the run) while the new layers train, then a linear warm-up of the same length to
            ``encoder_lr_scale`` (0.5) × the cosine lr, no layer-wise decay. A mapping ``{freeze_steps,
            warmup_steps, encoder_lr_scale, llrd}`` sets them (missing: ``auto``'s). Resolved at run start
            (``config.yaml``, recipe, MLflow params). Refused with ``freeze_encoder``, ``encoder_warmup_steps``,
            or ``llrd`` set both here and at the top level.
        grad_clip: max global grad norm (``None``/0 disables).
        ema_decay: validate, select and test an exponential moving average of the weights with this decay in
            (0, 1) (warmed up as ``min(decay, (1 + t) / (10 + t))``; :mod:`medssl.engines.finetune.ema`), which
            ``best.pt`` then holds; ``None`` (default): the trained weights themselves.
        self_training: train on the run's labelled cases plus a teacher's pseudo-labels of the seed's unlabeled
            volumes (segmentation; :mod:`medssl.engines.finetune.pseudo`): ``{teacher: <finetune checkpoint / run
            folder / URI>, pool: seed | study, labelled_share: 0.5, tta: true, copy_paste: 0.0}`` or just the
            teacher; ``copy_paste`` > 0 swaps a box between (true, pseudo) pairs of each batch with that probability
            (:mod:`medssl.engines.finetune.mix`); ``None`` (default): labelled cases only. Validation, selection and
            test use true labels only.
        max_nan_steps: this many non-finite losses in a row abort the run (each is skipped).
        amp: ``"bf16"``, ``"fp16"`` or ``None`` (CUDA only).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        deterministic: ``torch.use_deterministic_algorithms(True)`` during the run.
        num_workers: data loader workers (0 = in process).
        cache_rate: share of preprocessed volumes kept in memory (``CacheDataset``).
        out_dir: run folder (``checkpoints/last.pt``, ``checkpoints/best.pt``, ``config.yaml``, reports).
        experiment: MLflow experiment; ``None`` disables tracking.
        run_name: MLflow run name (default: the out dir name).
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``).
        parent_run_id: MLflow parent run (sweeps).
        tags: extra MLflow tags.
        min_transfer_match: least share of the network's encoder values the SSL checkpoint must fill.
        allow_partial_transfer: continue below ``min_transfer_match`` (warned).
    """

    datalist: str = ""
    splits: str = ""
    fraction: float = 100.0
    seed: int = 0
    study: str | None = None
    init: str = "scratch"
    task: str = "segmentation"
    network: str = "SegResNet"
    network_kwargs: dict[str, Any] | str = field(default_factory=dict)
    out_channels: int | str = 3
    num_classes: int = 2
    class_key: str = "class"
    roi_size: list[int] | str = field(default_factory=lambda: [32, 32, 32])
    target_spacing: list[float] | str | None = None
    normalisation: str | None = None
    ct_window: list[float] | None = None
    override_preprocessing: bool = False
    batch_size: int | str = 2
    num_samples: int | str = 2
    sampling: str = "posneg"
    class_ratios: list[float] | None = None
    planner: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    in_channels: int | None = None
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    max_epochs: int = 100
    max_steps: int = 0
    val_every: int = 1
    val_every_steps: int = 0
    early_stopping_patience: int = 0
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    tta: bool = False
    freeze_encoder: bool = False
    llrd: float | None = None
    encoder_warmup_steps: int = 0
    ssl_schedule: str | dict[str, Any] = "none"
    grad_clip: float | None = None
    ema_decay: float | None = None
    self_training: dict[str, Any] | str | None = None
    max_nan_steps: int = 5
    amp: str | None = None
    device: str = "auto"
    deterministic: bool = False
    num_workers: int = 0
    cache_rate: float = 1.0
    out_dir: str = "runs/finetune"
    experiment: str | None = "medssl-finetune"
    run_name: str | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    min_transfer_match: float = 1.0
    allow_partial_transfer: bool = False

    def __post_init__(self) -> None:
        for name in ("roi_size", "target_spacing", "ct_window"):
            v = getattr(self, name)
            if is_auto(v):
                setattr(self, name, AUTO)
            elif isinstance(v, (int, float)) and name != "ct_window":
                setattr(self, name, [v] * 3)
            elif isinstance(v, tuple):
                setattr(self, name, list(v))
        self.fraction = float(self.fraction)
        self.augment = resolve_augment(self.augment)
        self.ssl_schedule = normalise_ssl_schedule(self.ssl_schedule)
        self.self_training = normalise_self_training(self.self_training)
        self.validate()

    @property
    def auto_fields(self) -> list[str]:
        """Fields still ``"auto"`` (``network_kwargs`` also when one of its values is)."""
        out = [f for f in AUTO_FIELDS if is_auto(getattr(self, f))]
        if isinstance(self.network_kwargs, dict) and any(is_auto(v) for v in self.network_kwargs.values()):
            out.append("network_kwargs")
        return out

    @property
    def init_kind(self) -> str:
        """``"ssl"`` or ``"scratch"`` (the MLflow tag ``medssl.init``)."""
        return "ssl" if self.init.startswith("ssl:") else "scratch"

    @property
    def ssl_source(self) -> str | None:
        """The checkpoint path / URI after ``ssl:``, or ``None`` from scratch."""
        return self.init[len("ssl:") :] if self.init.startswith("ssl:") else None

    def validate(self) -> None:
        """Check value ranges; raises ``ValueError`` naming the field and value."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {self.network!r}")
        if (self.task == "classification") != (self.network == "ResNet"):
            seg = ", ".join(n for n in NETWORKS if n != "ResNet")
            raise ValueError(
                f"network {self.network!r} does not do {self.task} (ResNet classifies; {seg} segment)"
            )
        if self.init != "scratch" and not (self.init.startswith("ssl:") and len(self.init) > 4):
            raise ValueError(
                f"init must be 'scratch' or 'ssl:<checkpoint path or MLflow URI>', got {self.init!r}"
            )
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {_AMP}, got {self.amp!r}")
        if self.normalisation not in _NORM:
            raise ValueError(f"normalisation must be one of {_NORM}, got {self.normalisation!r}")
        for name in AUTO_FIELDS:
            if isinstance(getattr(self, name), str) and not is_auto(getattr(self, name)):
                raise ValueError(f"{name} must be a value or 'auto', got {getattr(self, name)!r}")
        if self.auto_fields and self.task != "segmentation":
            raise ValueError(f"'auto' {self.auto_fields} is planned for segmentation only; set explicit values")
        if not is_auto(self.roi_size) and (len(self.roi_size) != 3 or min(self.roi_size) < 1):
            raise ValueError(f"roi_size must be 3 positive ints (D, H, W) or 'auto', got {self.roi_size!r}")
        if self.target_spacing is not None and not is_auto(self.target_spacing) and (
            len(self.target_spacing) != 3 or min(self.target_spacing) <= 0
        ):
            raise ValueError(f"target_spacing must be 3 positive mm values, got {self.target_spacing!r}")
        if self.ct_window is not None and (
            len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]
        ):
            raise ValueError(f"ct_window must be [min, max] HU with min < max, got {self.ct_window!r}")
        if self.in_channels is not None and int(self.in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1 or None (= the data's), got {self.in_channels!r}")
        if not 0.0 < self.fraction <= 100.0:
            raise ValueError(f"fraction is percent in (0, 100], got {self.fraction!r}")
        for name in (
            "batch_size",
            "num_samples",
            "val_every",
            "sw_batch_size",
            "out_channels",
            "num_classes",
        ):
            if not is_auto(getattr(self, name)) and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in (
            "max_epochs",
            "max_steps",
            "warmup_steps",
            "early_stopping_patience",
            "encoder_warmup_steps",
            "num_workers",
            "val_every_steps",
        ):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_epochs == 0 and self.max_steps == 0:
            raise ValueError("set max_epochs or max_steps (both are 0)")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap!r}")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {self.cache_rate!r}")
        if self.llrd is not None and not 0.0 < self.llrd <= 1.0:
            raise ValueError(f"llrd must be in (0, 1] or None, got {self.llrd!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None (off), got {self.ema_decay!r}")
        if self.self_training is not None and self.task != "segmentation":
            raise ValueError("self_training is for segmentation (pseudo label maps); set it to null")
        if not 0.0 < self.min_transfer_match <= 1.0:
            raise ValueError(f"min_transfer_match must be in (0, 1], got {self.min_transfer_match!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.class_ratios is not None and not is_auto(self.out_channels):
            class_ratios(int(self.out_channels), self.class_ratios)
        check_ssl_schedule_options(
            self.ssl_schedule, freeze_encoder=self.freeze_encoder, encoder_warmup_steps=self.encoder_warmup_steps,
            llrd=self.llrd,
        )
        if self.network in SCRATCH_ONLY and (
            self.init != "scratch" or self.freeze_encoder or self.llrd is not None or self.encoder_warmup_steps
        ):
            raise ValueError(
                f"network {self.network!r} trains from scratch only (no SSL transfer, so no init=ssl:…, "
                "freeze_encoder, llrd or encoder_warmup_steps); use SegResNet, BasicUNet or UNet for SSL inits"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr > 0, min_lr >= 0, weight_decay >= 0 expected, got {self.lr}, {self.min_lr}, {self.weight_decay}"
            )
