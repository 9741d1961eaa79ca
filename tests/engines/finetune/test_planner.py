"""Segmentation planner (medssl/engines/finetune/planner.py) and its run-start resolution (finetune/plan.py): plans of
generated volumes of known shapes and spacings, the real hippocampus headers, "auto" fields resolved and
recorded, explicit values winning, the pre-training refusals, class-aware crop sampling, a 3-step run with
``roi_size: auto`` and ``network: UNet``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medssl.data.splits import split_datalist
from medssl.engines.finetune import Finetuner, rebuild_model, run_finetune
from medssl.engines.finetune.augment import crop_transforms
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import planning_items
from medssl.engines.finetune.identity import config_hash, config_identity
from medssl.engines.finetune.planner import (
    median_target_spacing,
    plan_patch,
    plan_segmentation,
    volume_header,
)
from medssl.errors import MedsslError

TINY_UNET = {"base_width": 4, "max_width": 16, "step_voxel_budget": 1}  # batch = min_batch (2)


def _save(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return str(path)


def _label(shape: tuple[int, int, int], classes=(1, 2)) -> np.ndarray:
    """A blob of class 1 (small, 3³) and of class 2 (larger) in the middle of ``shape``."""
    lab = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    if 2 in classes:
        lab[c[0] - 3 : c[0] + 4, c[1] - 3 : c[1] + 4, c[2] - 3 : c[2] + 4] = 2
    if 1 in classes:
        lab[c[0] - 1 : c[0] + 2, c[1] - 5 : c[1] - 2, c[2] - 1 : c[2] + 2] = 1
    return lab


def _study(tmp: Path, shapes, *, classes=(1, 2), spacing=(1.0, 1.0, 1.0), labels=None,
           fractions=(50, 100)) -> tuple[Path, Path]:
    """Generated images + labels of the given shapes, a datalist (optional ``labels`` table) and splits."""
    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True, exist_ok=True)
    items = []
    for i, shape in enumerate(shapes):
        lab = _label(tuple(shape), classes)
        img = (rng.normal(size=shape) + 3 * lab).astype(np.float32)
        items.append({"image": _save(tmp / f"img{i}.nii.gz", img, spacing),
                      "label": _save(tmp / f"lab{i}.nii.gz", lab, spacing), "case_id": f"c{i:02d}"})
    data = {"training": items} | ({"labels": labels} if labels else {})
    (tmp / "datalist.json").write_text(json.dumps(data))
    splits, _ = split_datalist(tmp / "datalist.json", fractions=list(fractions), seeds=[0],
                               test_fraction=0.2, val_fraction=0.2)
    return tmp / "datalist.json", splits


def _cfg(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(datalist=str(data[0]), splits=str(data[1]), fraction=100, network="UNet",
                network_kwargs="auto", roi_size="auto", batch_size="auto", num_samples="auto",
                out_channels="auto", planner=TINY_UNET, sampling="classes", max_steps=3, lr=1e-2,
                sw_overlap=0.0, device="cpu", deterministic=True, out_dir=str(out), experiment=None)
    return FinetuneConfig(**(base | kw))


# -- planner on generated volumes -----------------------------------------------------------------------
def test_whole_volume_patch_is_median_rounded_up_to_the_strides() -> None:
    p = plan_patch([35, 50, 36], [1.0, 1.0, 1.0], patch_voxel_budget=64**3)
    assert p["strides"] == [[2, 2, 2]] * 3 and p["levels"] == 3
    assert p["patch_size"] == [40, 56, 40] and p["whole_volume"]
    assert all(s % 2 ** p["levels"] == 0 for s in p["patch_size"])
    assert 4 <= min(p["bottleneck"]) and max(p["bottleneck"]) <= 8


def test_budget_fallback_keeps_the_aspect_ratio_inside_the_budget() -> None:
    p = plan_patch([200, 100, 100], [1.0, 1.0, 1.0], patch_voxel_budget=32**3)
    assert math.prod(p["patch_size"]) <= 32**3 and not p["whole_volume"]
    x, y, z = p["patch_size"]
    assert x > y and y == z and 1.5 <= x / y <= 2.5  # the median's 2:1:1
    div = [math.prod(st[a] for st in p["strides"]) for a in range(3)]
    assert all(s % d == 0 for s, d in zip(p["patch_size"], div, strict=True))
    assert min(p["bottleneck"]) >= 4


def test_anisotropic_spacing_pools_the_coarse_axis_later() -> None:
    sp = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 3.0], [0.8, 0.8, 5.0]])
    target = median_target_spacing(sp)
    assert target[:2] == [0.8, 0.8] and target[2] == pytest.approx(np.percentile(sp[:, 2], 10))
    p = plan_patch([160, 160, 24], [0.8, 0.8, 4.5], patch_voxel_budget=96 * 96 * 24)
    assert p["strides"][0] == [2, 2, 1] and p["strides"][1] == [2, 2, 1]  # 0.8 → 1.6 → 3.2 mm first
    assert [2, 2, 2] in p["strides"]  # then z pools too
    assert median_target_spacing(np.array([[1.0, 1.0, 2.0]])) == [1.0, 1.0, 2.0]  # not anisotropic: median


def test_plan_from_generated_headers(tmp_path: Path) -> None:
    shapes = [(20, 30, 24), (22, 30, 26), (24, 34, 24), (20, 28, 22), (26, 32, 24)]
    data = _study(tmp_path, shapes, spacing=(2.0, 1.0, 1.0))
    items = planning_items(*data)
    plan = plan_segmentation(items)  # median spacing 2 × 1 × 1 mm
    assert plan["target_spacing"] == [2.0, 1.0, 1.0] and plan["spacing_source"] == "median"
    assert plan["median_shape"] == list(np.median([shapes[int(it["case_id"][1:])] for it in items], 0).astype(int))
    assert all(p >= m for p, m in zip(plan["patch_size"], plan["median_shape"], strict=True))
    assert plan["classes"] == {"0": "background", "1": "1", "2": "2"} and plan["num_classes"] == 3
    assert plan["num_samples"] == 1 and 2 <= plan["batch_size"] <= 32
    unet = plan["network"]["UNet"]
    assert len(unet["channels"]) == plan["levels"] + 1 == len(unet["strides"]) + 1
    # resampled to 1 mm: the first axis doubles
    plan1 = plan_segmentation(items, target_spacing=[1.0, 1.0, 1.0])
    assert plan1["median_shape"][0] == 2 * plan["median_shape"][0] and plan1["spacing_source"] == "given"
    # a smaller step budget → a smaller batch; the budget bound holds
    small = plan_segmentation(items, step_voxel_budget=3 * math.prod(plan["patch_size"]))
    assert small["batch_size"] == 3
    with pytest.raises(MedsslError, match="unknown planner option"):
        plan_segmentation(items, patch_budget=1)


def test_volume_header_is_in_ras_order(tmp_path: Path) -> None:
    aff = np.array([[0, 0.8, 0, 0], [1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # axes (y, x, z)
    nib.save(nib.Nifti1Image(np.zeros((50, 35, 36), np.float32), aff), tmp_path / "v.nii.gz")
    assert volume_header(tmp_path / "v.nii.gz") == ([35, 50, 36], [0.8, 1.0, 2.0])


def test_classes_from_the_datalist_table(tmp_path: Path) -> None:
    data = _study(tmp_path, [(16, 16, 16)] * 5, labels={"0": "background", "1": "a", "2": "b", "3": "c"})
    plan = plan_segmentation(planning_items(*data),
                             labels=json.loads(data[0].read_text())["labels"])
    assert plan["num_classes"] == 4 and plan["classes"]["3"] == "c"


# -- real hippocampus headers ---------------------------------------------------------------------------
def test_plan_on_real_hippocampus_headers(hippocampus_dir: Path) -> None:
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))
    items = [{"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name)} for p in images]
    plan = plan_segmentation(items)
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["cases"] == len(images)
    assert 33 <= plan["median_shape"][0] <= 37 and 48 <= plan["median_shape"][1] <= 52  # ~35 × 50 × 35
    assert all(p >= m for p, m in zip(plan["patch_size"], plan["median_shape"], strict=True))
    assert plan["patch_size"] in ([40, 56, 40], [48, 64, 48]) and plan["whole_volume"]
    assert plan["num_classes"] == 3 and plan["batch_size"] >= 2


# -- config: "auto" fields ------------------------------------------------------------------------------
def test_auto_fields_are_validated() -> None:
    cfg = FinetuneConfig(roi_size="AUTO", batch_size="auto", network_kwargs={"channels": "auto"})
    assert cfg.roi_size == "auto" and set(cfg.auto_fields) == {"roi_size", "batch_size", "network_kwargs"}
    with pytest.raises(ValueError, match="roi_size must be a value or 'auto'"):
        FinetuneConfig(roi_size="big")
    with pytest.raises(ValueError, match="segmentation only"):
        FinetuneConfig(task="classification", network="ResNet", roi_size="auto")
    assert FinetuneConfig(network="UNet", init="ssl:enc.pt").init_kind == "ssl"  # SparK monai_unet inits
    with pytest.raises(ValueError, match="sampling must be one of"):
        FinetuneConfig(sampling="random")
    with pytest.raises(ValueError, match="class_ratios must be 3"):
        FinetuneConfig(class_ratios=[1, 1])


def test_new_fields_at_their_defaults_keep_the_config_hash() -> None:
    base = FinetuneConfig()
    ident = config_identity(base)
    assert "sampling" not in ident and "val_every_steps" not in ident  # hashes of earlier studies hold
    assert config_hash(config_identity(base.replace(sampling="classes"))) != config_hash(ident)


@pytest.fixture(scope="module")
def gen_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    shapes = [(18, 24, 18), (20, 24, 16), (18, 22, 18), (20, 26, 18), (16, 24, 18), (18, 24, 20),
              (20, 22, 18), (18, 24, 16), (22, 24, 18), (18, 26, 18)]
    return _study(tmp_path_factory.mktemp("gen"), shapes)


def test_auto_resolved_and_recorded_explicit_values_win(gen_study, tmp_path: Path) -> None:
    ft = Finetuner(_cfg(gen_study, tmp_path / "a"))
    plan = ft.plan
    assert ft.cfg.roi_size == plan["patch_size"] and ft.cfg.out_channels == 3
    assert ft.cfg.batch_size == 2 and ft.cfg.num_samples == plan["num_samples"]
    assert ft.cfg.network_kwargs == plan["network"]["UNet"] and ft.cfg.auto_fields == []
    assert ft.recipe["plan"] == plan and ft.recipe["roi_size"] == plan["patch_size"]
    assert ft.sampling == "classes"  # the median-sized patch does not cover the largest volumes
    explicit = Finetuner(_cfg(gen_study, tmp_path / "b", roi_size=[32, 32, 32], batch_size=3,
                              network_kwargs={"channels": "auto", "strides": [2, 2], "num_res_units": 1}))
    assert explicit.cfg.roi_size == [32, 32, 32] and explicit.cfg.batch_size == 3
    assert explicit.cfg.network_kwargs == {"channels": plan["network"]["UNet"]["channels"],
                                           "strides": [2, 2], "num_res_units": 1}
    assert explicit.sampling == "whole"  # 32³ covers every training volume: padding only


def test_recipes_that_cannot_fit_fail_before_training(gen_study, tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="out_channels=2 .* set out_channels: 3"):
        Finetuner(_cfg(gen_study, tmp_path / "a", out_channels=2))
    with pytest.raises(MedsslError, match="lower batch_size to <= 3"):
        Finetuner(_cfg(gen_study, tmp_path / "b", fraction=50, batch_size=5))
    with pytest.raises(MedsslError, match=r"roi_size=\[64, 64, 64\] is more than twice"):
        Finetuner(_cfg(gen_study, tmp_path / "c", roi_size=[64, 64, 64]))
    auto = Finetuner(_cfg(gen_study, tmp_path / "d", fraction=50))  # auto batch: at most the cases
    assert auto.cfg.batch_size <= len(auto.items["training"])


def test_class_absent_from_the_training_cases_is_refused(tmp_path: Path) -> None:
    table = {"0": "background", "1": "small", "2": "large", "3": "never"}
    data = _study(tmp_path / "d", [(16, 20, 16)] * 6, labels=table)
    with pytest.raises(MedsslError, match=r"no training case with class\(es\) \{3: 'never'\}"):
        Finetuner(_cfg(data, tmp_path / "r"))


def test_no_validation_case_is_refused(tmp_path: Path) -> None:
    data = _study(tmp_path / "d", [(16, 20, 16)] * 5)
    sp = json.loads(data[1].read_text())
    sp["seeds"]["0"]["validation"] = []
    data[1].write_text(json.dumps(sp))
    with pytest.raises(MedsslError, match="no validation case"):
        Finetuner(_cfg(data, tmp_path / "r"))


# -- class-aware sampling -------------------------------------------------------------------------------
def _centre_classes(sampling: str, draws: int = 400) -> np.ndarray:
    lab = _label((40, 40, 40))[None].astype(np.float32)  # class 1: 27 voxels, class 2: 343
    tf = crop_transforms(["image", "label"], (3, 3, 3), sampling=sampling, num_samples=draws, num_classes=3)
    for t in tf:
        if hasattr(t, "set_random_state"):
            t.set_random_state(0)
    d = {"image": torch.from_numpy(lab.copy()), "label": torch.from_numpy(lab)}
    for t in tf:
        d = t(d)
    return np.bincount([int(s["label"][0, 1, 1, 1]) for s in d], minlength=3) / draws


def test_class_aware_sampling_draws_each_class_by_its_ratio() -> None:
    share = _centre_classes("classes")
    assert share == pytest.approx([1 / 3] * 3, abs=0.07)  # the 27-voxel class as often as the rest
    posneg = _centre_classes("posneg")
    assert posneg[0] == pytest.approx(0.5, abs=0.07) and posneg[1] < 0.15  # 27 / 370 of foreground


# -- a real (tiny) run ----------------------------------------------------------------------------------
def test_three_step_unet_run_with_auto_recipe(gen_study, tmp_path: Path) -> None:
    cfg = _cfg(gen_study, tmp_path / "run", val_every_steps=2, max_steps=3)
    res = run_finetune(cfg, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["roi_size"] == plan["patch_size"] and saved["network_kwargs"] == plan["network"]["UNet"]
    assert saved["batch_size"] == 2 and saved["out_channels"] == 3 and saved["network"] == "UNet"
    best = torch.load(res.best_checkpoint, weights_only=False)
    assert best["recipe"]["plan"]["patch_size"] == plan["patch_size"] and best["recipe"]["sampling"] == "classes"
    model = rebuild_model(best["recipe"])
    model.load_state_dict(best["model"])
    assert model(torch.zeros(1, 1, *plan["patch_size"])).shape == (1, 3, *plan["patch_size"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    val_steps = [h["step"] for h in last["history"] if "val_dice_mean" in h]
    assert val_steps == [2.0, 3.0]  # every 2 steps, and after the last
    assert {"dice_1", "dice_2", "dice_mean"} <= set(res.test_metrics)


def test_recipe_check_pipeline_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.engines.studies.pipeline import finetune_dict, load_pipeline

    monkeypatch.setenv("MEDSSL_DATASETS", "/nonexistent")
    pl = load_pipeline(Path(__file__).resolve().parents[3] / "pipelines" / "recipe_check.yaml")
    assert pl.inits == ["scratch"] and pl.fractions == [10, 100] and pl.seeds == [0]
    for f in pl.fractions:
        cfg = FinetuneConfig.from_dict({**finetune_dict(pl, f, "scratch"), "fraction": f})
        assert cfg.network == "UNet" and cfg.sampling == "classes" and cfg.val_every_steps > 0
        assert {"roi_size", "batch_size", "network_kwargs"} <= set(cfg.auto_fields)


def test_ssl_init_keeps_its_encoder_and_rounds_the_patch_to_its_divisor(gen_study, tmp_path: Path) -> None:
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    enc = {"init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1],  # size_divisor 2**2
           "norm": ["GROUP", {"num_groups": 2}]}
    pre = run_pretraining(toy_config(
        write_volumes(tmp_path / "vols", n=2), tmp_path / "pre", method="simclr", encoder="segresnet",
        augment=None, encoder_kwargs=enc, method_kwargs={"hidden_dim": 8, "out_dim": 4}, total_steps=1,
        warmup_steps=0, source_size=[20, 20, 20], target_spacing=[1.0, 1.0, 1.0]), progress=False)
    cfg = _cfg(gen_study, tmp_path / "ft", network="SegResNet", init=f"ssl:{pre.encoder_path}",
               planner={"max_levels": 1, "step_voxel_budget": 1})  # patch: multiples of 2 only
    ft = Finetuner(cfg)
    assert ft.cfg.network_kwargs == {} and ft.cfg.target_spacing == [1.0, 1.0, 1.0]  # the recipe's
    patch = ft.plan["patch_size"]
    assert any(p % 4 for p in patch) and ft.cfg.roi_size == [math.ceil(p / 4) * 4 for p in patch]
    assert ft.transfer is not None and ft.transfer["share"] == 1.0
