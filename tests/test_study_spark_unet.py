"""pipelines/label_efficiency_spark_unet.yaml parses into valid configs: SparK on the planner's MONAI UNet, the
same UNet finetuned in both arms (recipe_check.yaml's recipe), ``ssl_schedule: auto``. The study itself is a
background run (hours), never a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.config import PretrainConfig
from medssl.engines.finetune.build import build_model
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.planner import plan_segmentation
from medssl.engines.studies.pipeline import finetune_dict, load_pipeline
from medssl.methods import build_method
from medssl.networks.downstream import build_downstream
from medssl.networks.encoders import build_encoder

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "label_efficiency_spark_unet.yaml"


@pytest.fixture(scope="module")
def pl():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSSL_DATASETS", "/nonexistent")
        return load_pipeline(PIPELINE)


def test_grid_data_and_pretraining(pl) -> None:
    assert pl.study == "hippocampus-label-efficiency-spark-unet"
    assert pl.fractions == [5, 10, 25, 100] and pl.inits == ["scratch", "ssl"] and pl.seeds == [0, 1, 2]
    with pytest.MonkeyPatch.context() as mp:  # the same data (test set, fractions) as the SegResNet SparK study
        mp.setenv("MEDSSL_DATASETS", "/nonexistent")
        assert pl.data == load_pipeline(REPO / "pipelines" / "label_efficiency_spark.yaml").data
    pre = PretrainConfig.from_dict(pl.pretrain)
    assert pre.method == "spark" and pre.encoder == "monai_unet" and pre.batch_size == 8
    assert list(pre.roi_size) == [40, 56, 40] and 1000 <= pre.total_steps <= 3000
    assert pre.encoder_kwargs == {"channels": [32, 64, 128, 256], "strides": [2, 2, 2], "num_res_units": 2}
    text = PIPELINE.read_text()
    assert "s per step" in text and "25 min" in text  # the sizing is documented beside total_steps


def test_finetune_section_is_the_recipe_check_one_with_ssl(pl) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSSL_DATASETS", "/nonexistent")
        check = load_pipeline(REPO / "pipelines" / "recipe_check.yaml").finetune
    ours = dict(pl.finetune)
    assert ours.pop("ssl_schedule") == "auto"
    assert ours.pop("network_kwargs") == pl.pretrain["encoder_kwargs"]  # explicit: the SSL UNet's
    assert check.pop("network_kwargs") == "auto"
    assert ours == check  # everything else exactly recipe_check.yaml's
    for f in pl.fractions:
        for init in pl.inits:
            cfg = FinetuneConfig.from_dict({**finetune_dict(pl, f, init), "fraction": f, "init": (
                "ssl:runs/encoder.pt" if init == "ssl" else "scratch")})
            assert cfg.network == "UNet" and cfg.ssl_schedule == "auto"
            assert set(cfg.auto_fields) == {"out_channels", "roi_size", "batch_size", "num_samples"}


def test_planner_unet_pretrains_and_both_arms_build_it(pl, hippocampus_dir: Path, tmp_path: Path) -> None:
    d = hippocampus_dir
    items = [{"image": str(p), "label": str(d / "labelsTr" / p.name)} for p in sorted((d / "imagesTr").glob("*.nii.gz"))]
    plan = plan_segmentation(items[:40], target_spacing=[1.0, 1.0, 1.0])
    assert plan["network"]["UNet"] == pl.pretrain["encoder_kwargs"] == pl.finetune["network_kwargs"]
    roi = tuple(pl.pretrain["roi_size"])
    torch.manual_seed(0)
    enc = build_encoder("monai_unet", in_channels=1, img_size=roi, **pl.pretrain["encoder_kwargs"])
    spark = build_method("spark", enc, **pl.pretrain["method_kwargs"])
    assert spark.patch_size == (8, 8, 8) and spark.grid_shape(roi) == (5, 7, 5)
    path = tmp_path / "encoder.pt"
    torch.save({"recipe": {"encoder": enc.recipe, "in_channels": 1, "target_spacing": [1.0, 1.0, 1.0],
                           "normalisation": "robust"}, "state_dict": enc.state_dict()}, path)
    base = {**finetune_dict(pl, 10, "ssl"), "roi_size": list(roi), "out_channels": 3, "batch_size": 4,
            "num_samples": 1}
    scratch, *_ = build_model(FinetuneConfig.from_dict(base | {"init": "scratch"}))
    ssl, _, rep, _ = build_model(FinetuneConfig.from_dict(base | {"init": f"ssl:{path}"}))
    assert {k: v.shape for k, v in scratch.state_dict().items()} == {k: v.shape for k, v in ssl.state_dict().items()}
    assert 4.5e6 < sum(p.numel() for p in ssl.parameters()) < 5e6  # the 4.7 M-parameter planner UNet
    assert rep.share == 1.0 and all(k.startswith("model.2.") for k in rep.new)
    assert build_downstream("UNet", recipe=enc.recipe, out_channels=3) is not None


def test_self_training_students_follow_the_unchanged_children(pl) -> None:
    """The shipped study's scratch+st arm at 5 / 10 %: six students after the 24 children, whose order (and SLURM
    array indices) is that of the study without students."""
    assert pl.self_training["inits"] == ["scratch"] and pl.self_training["fractions"] == [5.0, 10.0]
    assert pl.rounds == 1 and pl.arms == ["scratch", "ssl", "scratch+st"]
    kids = pl.children()
    without = dict(vars(pl)) | {"self_training": None}
    assert kids[:24] == type(pl)(**without).children() and len(kids) == 30
    assert kids[24:] == [(f, "scratch+st", s) for f in (5.0, 10.0) for s in (0, 1, 2)]
    # the students mix true and pseudo-labelled volumes by bidirectional copy-paste (chosen on validation, 3 seeds)
    assert pl.student_options() == {"copy_paste": 1.0}
