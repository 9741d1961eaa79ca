"""benchmarks/seg_probe.py: the output layer alone trains on frozen pretrained (or random) U-Net features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medssl.engines.runtime.checkpoint import save_encoder
from medssl.networks.downstream import transfer_key_prefixes
from medssl.networks.encoders import build_encoder
from tests.engines.finetune._cubes import cube_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seg_probe as sp  # noqa: E402

ROI = [16, 16, 16]
UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 1}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run config.yaml (5 cases of 16³, a bright cube labelled 1; study fields set as a sweep child's) and a
    ``monai_unet`` encoder file as SparK pretraining writes it."""
    folder = tmp_path_factory.mktemp("segprobe")
    datalist, splits = cube_study(folder)
    torch.manual_seed(3)
    enc = build_encoder("monai_unet", in_channels=1, img_size=ROI, **UNET)
    recipe = dict(encoder=enc.recipe, method="spark", in_channels=1, roi_size=ROI, target_spacing=None,
                  normalisation="none", ct_window=[-1000.0, 1000.0])
    pt = save_encoder(folder / "pretrain", enc, recipe)[0]
    cfg = dict(datalist=str(datalist), splits=str(splits), fraction=100.0, seed=0,
               study="s", parent_run_id="deadbeef", tags={"medssl.sweep_key": "f100-ssl-s0"}, run_name="s/f100",
               experiment="study-exp", tracking_uri="sqlite:////nonexistent/study.db", out_dir="/nonexistent",
               init=f"ssl:{pt}", task="segmentation", network="UNet", network_kwargs=UNET, out_channels=2,
               roi_size=ROI, normalisation="none", batch_size=1, num_samples=1, max_steps=40, lr=1e-2,
               sw_overlap=0.0, sw_batch_size=1, device="cpu", deterministic=True, augment={"flip_prob": 0.0},
               ssl_schedule="auto")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "config.yaml", pt


def test_random_encoder_keeps_the_recipe_with_fresh_weights(study: tuple[Path, Path], tmp_path: Path) -> None:
    _, pt = study
    out = sp.random_encoder(pt, tmp_path / "random", seed=0)
    a, b = (torch.load(p, weights_only=False) for p in (pt, out))
    assert a["recipe"] == b["recipe"] and a["state_dict"].keys() == b["state_dict"].keys()
    weights = [k for k, v in a["state_dict"].items() if v.ndim == 5]  # conv kernels (norm/PReLU start constant)
    assert weights
    assert not any(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in weights)
    again = torch.load(sp.random_encoder(pt, tmp_path / "again", seed=0), weights_only=False)
    assert all(torch.equal(again["state_dict"][k], b["state_dict"][k]) for k in weights)  # seeded


def test_probe_config_freezes_the_pretrained_part_for_every_step_outside_the_study(
    study: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg_path, pt = study
    cfg = sp.probe_config(yaml.safe_load(cfg_path.read_text()), pt, tmp_path, "spark", steps=30, val_every=10)
    assert cfg.ssl_schedule == {"freeze_steps": 30, "warmup_steps": 0, "encoder_lr_scale": 1.0, "llrd": None}
    assert (cfg.max_steps, cfg.val_every_steps, cfg.init) == (30, 10, f"ssl:{pt}")
    assert cfg.study is None and cfg.parent_run_id is None and not cfg.tags  # its own run, not a study child
    assert cfg.out_dir == str(tmp_path / "spark") and cfg.tracking_uri.endswith(f"{tmp_path}/mlruns.db")
    assert (cfg.fraction, cfg.seed, cfg.network_kwargs) == (100.0, 0, UNET)  # the study's recipe is kept


def test_main_trains_only_the_output_layer(study: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    cfg_path, pt = study
    res = sp.main(["--config", str(cfg_path), "--encoder", f"ssl={pt}", "--encoder", f"rnd=random:{pt}",
                   "--steps", "12", "--val-every", "6", "--out", str(tmp_path)])
    assert set(res["probes"]) == {"ssl", "rnd"}
    for name, src in (("ssl", pt), ("rnd", tmp_path / "rnd" / "encoder.pt")):
        row = res["probes"][name]
        assert 0.0 <= row["best_val"]["dice_mean"] <= 1.0 and row["transferred"]["share"] == 1.0
        pre = torch.load(src, weights_only=False)["state_dict"]
        best = torch.load(tmp_path / name / "checkpoints" / "best.pt", weights_only=False)["model"]
        frozen = [k for k in best if k.startswith(transfer_key_prefixes("UNet", "monai_unet"))]
        assert frozen and all(torch.equal(best[k], pre[f"net.{k}"]) for k in frozen)  # encoder + decoder as loaded
        assert any(k.startswith("model.2.") for k in best) and not any(k.startswith("model.2.") for k in frozen)
    assert json.loads((tmp_path / "seg_probe.json").read_text())["probes"].keys() == {"ssl", "rnd"}
    assert "| ssl |" in capsys.readouterr().out
