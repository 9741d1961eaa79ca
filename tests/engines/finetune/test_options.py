"""Finetuning options that keep study numbers honest: native-grid metrics, multi-channel inputs, a strict
linear probe, configurable augmentation (and the hippocampus axis that must not be flipped)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from medssl.data.splits import split_datalist
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import eval_transforms, train_transforms
from medssl.engines.finetune.engine import Finetuner
from medssl.engines.runtime.checkpoint import save_encoder
from medssl.errors import MedsslError
from medssl.networks.encoders import build_encoder

SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}
ROOT = Path(__file__).resolve().parents[3]


def _volumes(folder: Path, *, channels: int = 1, n: int = 5, mixed: bool = False,
             four_d: bool = False) -> tuple[Path, Path]:
    """``n`` anisotropic 8×8×4 cases (spacing 1×1×3 mm): image value = z index (+ channel), label 1 on the
    last z slice; ``channels`` files per case (``"image": [...]`` when > 1); ``mixed``: case 0 one channel;
    ``four_d``: one 4D file per case with its ``"channels"`` names (MSD multi-modal layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    z = np.broadcast_to(np.arange(4, dtype=np.float32), (8, 8, 4))
    label = np.zeros((8, 8, 4), np.uint8)
    label[..., 3] = 1
    items = []
    for i in range(n):
        paths = []
        for c in range(channels):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(z + c), affine), folder / f"img{i}_{c}.nii.gz")
            paths.append(f"img{i}_{c}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"lab{i}.nii.gz")
        image = paths[0] if channels == 1 or (mixed and i == 0) else paths
        item = {"image": image, "label": f"lab{i}.nii.gz", "case_id": f"case{i}"}
        if four_d:
            stack = np.stack([np.ascontiguousarray(z + c) for c in range(channels)], axis=-1)  # (X, Y, Z, C)
            nib.save(nib.Nifti1Image(stack, affine), folder / f"img{i}_4d.nii.gz")
            item |= {"image": f"img{i}_4d.nii.gz", "channels": [f"m{c}" for c in range(channels)]}
        items.append(item)
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(folder / "datalist.json", fractions=[100], seeds=[0], test_fraction=0.2,
                               val_fraction=0.2)
    return folder / "datalist.json", splits


def _cfg(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(datalist=str(data[0]), splits=str(data[1]), network="SegResNet", network_kwargs=SEG_NET,
                out_channels=2, roi_size=[8, 8, 8], normalisation="none", batch_size=1, num_samples=1,
                max_steps=3, sw_overlap=0.0, sw_batch_size=1, device="cpu", out_dir=str(out), experiment=None)
    return FinetuneConfig(**(base | kw))


class _Fixed(nn.Module):
    """Logits from the image alone: class 1 where ``select(image)`` (no weights)."""

    def __init__(self, select) -> None:
        super().__init__()
        self.select = select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.select(x[:, :1]).float() * 2 - 1
        return torch.cat([-one, one], dim=1)


def test_metrics_are_computed_in_the_native_label_grid(tmp_path: Path) -> None:
    data = _volumes(tmp_path / "d")
    ft = Finetuner(_cfg(data, tmp_path / "run", target_spacing=[1.0, 1.0, 1.0]))
    case = ft.val_ds[0]
    assert tuple(case["native_label"].shape) == (1, 8, 8, 4) and case["label"].shape[-1] > 4  # resampled z
    # class 1 everywhere: native Dice = 2·64 / (256 + 64) = 0.4; on the resampled grid it would differ
    ft.model = _Fixed(lambda x: torch.ones_like(x, dtype=torch.bool))
    native = ft.evaluate(ft.val_ds)
    gt = case["label"]
    resampled_dice = float(2 * gt.sum() / (gt.numel() + gt.sum()))
    assert native["dice_1"] == pytest.approx(0.4, abs=1e-6)
    assert abs(resampled_dice - 0.4) > 0.02
    # class 1 on the first native slice only (image value z < 0.5): 3 slices × 3 mm from the label → 9 mm
    ft.model = _Fixed(lambda x: x < 0.5)
    native = ft.evaluate(ft.val_ds)
    assert native["dice_1"] == pytest.approx(0.0) and native["hd95_1"] == pytest.approx(9.0, abs=1e-4)
    # without target_spacing nothing changes: no native copy, the label as loaded
    plain = Finetuner(_cfg(data, tmp_path / "plain"))
    assert "native_label" not in plain.val_ds[0] and tuple(plain.val_ds[0]["label"].shape) == (1, 8, 8, 4)


def test_multichannel_items_set_in_channels(tmp_path: Path) -> None:
    data = _volumes(tmp_path / "mc", channels=2)
    ft = Finetuner(_cfg(data, tmp_path / "run"))
    assert ft.cfg.in_channels == 2 and ft.recipe["in_channels"] == 2
    assert ft.model.convInit.conv.weight.shape[1] == 2
    x = ft.val_ds[0]["image"]
    assert x.shape[0] == 2 and torch.allclose(x[1] - x[0], torch.ones_like(x[0]))  # channel order kept
    assert np.isfinite(ft.train_epoch(0))
    with pytest.raises(MedsslError, match=r"in_channels=1 but the items .* have 2 image channel"):
        Finetuner(_cfg(data, tmp_path / "bad", in_channels=1))
    enc = build_encoder("segresnet", in_channels=1, img_size=(8, 8, 8), **SEG_NET)
    recipe = dict(encoder=enc.recipe, method="simclr", in_channels=1, roi_size=[8, 8, 8], target_spacing=None,
                  normalisation="none", ct_window=[-1000.0, 1000.0])
    pt, _ = save_encoder(tmp_path / "ssl", enc, recipe)
    with pytest.raises(MedsslError, match=r"in_channels: 1 != 2"):
        Finetuner(_cfg(data, tmp_path / "ssl_run", init=f"ssl:{pt}", network_kwargs={}))
    mixed = _volumes(tmp_path / "mixed", channels=2, mixed=True)
    with pytest.raises(MedsslError, match=r"different channel counts \(case case0 has 1, case case\d has 2\)"):
        Finetuner(_cfg(mixed, tmp_path / "mixed_run"))


def test_four_d_items_count_their_channels_list(tmp_path: Path) -> None:
    """An MSD multi-modal case is one 4D file whose ``channels`` names its modalities: 2 input channels."""
    ft = Finetuner(_cfg(_volumes(tmp_path / "4d", channels=2, four_d=True), tmp_path / "run"))
    assert ft.cfg.in_channels == 2 and ft.recipe["in_channels"] == 2
    assert ft.model.convInit.conv.weight.shape[1] == 2
    x = ft.val_ds[0]["image"]
    assert x.shape[0] == 2 and torch.allclose(x[1] - x[0], torch.ones_like(x[0]))


def test_linear_probe_freezes_encoder_norm_statistics(tmp_path: Path) -> None:
    data = _volumes(tmp_path / "lp")
    net = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": "BATCH"}
    ft = Finetuner(_cfg(data, tmp_path / "run", network_kwargs=net, freeze_encoder=True, lr=1e-2))

    def stats() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in ft.model.state_dict().items() if k.endswith("running_mean")}

    before = stats()
    ft.model.train()
    enc_modules = [m for n, m in ft.model.named_modules() if n.startswith(("convInit", "down_layers"))]
    assert enc_modules and not any(m.training for m in enc_modules)
    assert ft.model.conv_final.training
    ft.train_epoch(0)
    after = stats()
    enc = {k for k in before if k.startswith(("convInit", "down_layers"))}
    head = set(before) - enc
    assert enc and head
    assert all(torch.equal(before[k], after[k]) for k in enc)  # frozen: running statistics untouched
    assert any(not torch.equal(before[k], after[k]) for k in head)  # the head's norms still learn
    from medssl.networks.downstream import freeze_encoder

    freeze_encoder(ft.model, "SegResNet", freeze=False)
    ft.model.train()
    assert all(m.training for m in enc_modules)


def test_augment_is_configurable_with_todays_default(tmp_path: Path) -> None:
    from monai.transforms import RandFlipd

    default = train_transforms("segmentation", roi_size=[8, 8, 8], normalisation="none")
    flips = [t for t in default.transforms if isinstance(t, RandFlipd)]
    assert [t.flipper.spatial_axis for t in flips] == [0, 1, 2] and all(t.prob == 0.5 for t in flips)
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    item = {"image": str(tmp_path / "v.nii.gz"), "label": 0}
    kw = dict(roi_size=[6, 5, 4], normalisation="none")
    plain = eval_transforms("classification", **kw)(dict(item))["image"]
    only_lr = train_transforms("classification", augment={"flip_prob": 1.0, "flip_axes": [0]}, **kw)
    assert torch.equal(only_lr(dict(item))["image"].as_tensor(), torch.flip(plain.as_tensor(), dims=[1]))
    none = train_transforms("classification", augment={"flip_prob": 0.0}, **kw)
    assert torch.equal(none(dict(item))["image"].as_tensor(), plain.as_tensor())
    cfg = FinetuneConfig(augment={"flip_axes": [0]})
    assert cfg.augment["flip_axes"] == [0] and cfg.augment["flip_prob"] == 0.5  # partial dict: defaults merged
    with pytest.raises(MedsslError, match=r"unknown augment key\(s\) \['flip'\]"):
        FinetuneConfig.from_dict({"augment": {"flip": 1}})
    with pytest.raises(MedsslError, match="flip_axes must list axes in 0..2"):
        FinetuneConfig.from_dict({"augment": {"flip_axes": [3]}})


def test_hippocampus_anterior_posterior_axis_is_not_flipped(hippocampus_dir: Path) -> None:
    """MSD hippocampus: class 1 (anterior) vs 2 (posterior) lie along array axis 1 after RAS orientation, so
    the hippocampus pipelines and the demo flip axis 0 (left/right) only."""
    tf = eval_transforms("segmentation", normalisation="none")
    for path in sorted((hippocampus_dir / "labelsTr").glob("*.nii.gz"))[:5]:
        lab = tf({"image": str(path), "label": str(path)})["label"][0].numpy()
        d = np.array(np.nonzero(lab == 1)).mean(1) - np.array(np.nonzero(lab == 2)).mean(1)  # (3,) voxels
        assert int(np.argmax(np.abs(d))) == 1 and d[1] > 0, (path.name, d)  # anterior = +A along axis 1
    for name in ("label_efficiency.yaml", "label_efficiency_genesis.yaml"):
        spec = yaml.safe_load((ROOT / "pipelines" / name).read_text())
        assert FinetuneConfig(augment=spec["finetune"]["augment"]).augment["flip_axes"] == [0], name
    from medssl.demo import DEMO_FINETUNE_AUGMENT

    assert FinetuneConfig(augment=DEMO_FINETUNE_AUGMENT).augment["flip_axes"] == [0]
