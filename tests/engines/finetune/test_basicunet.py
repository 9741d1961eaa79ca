"""`medssl finetune` with ``network: BasicUNet`` from a real Models Genesis checkpoint (tiny volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medssl.cli import app
from medssl.data.splits import split_datalist
from medssl.engines.finetune.build import build_model
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import run_finetune
from medssl.errors import ConfigMismatchError, MedsslError
from tests.networks.test_basicunet_transfer import FEATURES, ROI, genesis_pretraining

runner = CliRunner()


def _labelled_volumes(folder: Path, n: int = 5, seed: int = 0) -> Path:
    """``n`` 32³ images (noise + two bright blobs) with labels 1 (ball) and 2 (box) and ``datalist.json``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*(np.arange(32),) * 3, indexing="ij"))
    items = []
    for i in range(n):
        c = rng.integers(10, 22, size=3)
        label = (np.sum((grid - c[:, None, None, None]) ** 2, axis=0) < 36).astype(np.uint8)
        x0 = rng.integers(2, 8, size=3)
        label[x0[0] : x0[0] + 5, x0[1] : x0[1] + 5, x0[2] : x0[2] + 5] = 2
        image = rng.normal(0, 0.3, size=label.shape) + label * 1.5
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"case{i}"})
    (folder / "datalist.json").write_text(json.dumps({"training": items}))
    return folder / "datalist.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    datalist = _labelled_volumes(tmp_path_factory.mktemp("seg"))
    splits, _ = split_datalist(datalist, fractions=[100], seeds=[0], test_fraction=0.2, val_fraction=0.2)
    return datalist, splits


@pytest.fixture(scope="module")
def genesis(tmp_path_factory: pytest.TempPathFactory):
    return genesis_pretraining(tmp_path_factory.mktemp("genesis"))


def _config(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(datalist=str(data[0]), splits=str(data[1]), network="BasicUNet", network_kwargs={},
                out_channels=3, roi_size=ROI, batch_size=2, num_samples=1, max_steps=2, sw_overlap=0.0,
                lr=1e-2, device="cpu", deterministic=True, out_dir=str(out), experiment=None)
    return FinetuneConfig(**(base | kw))


def test_genesis_init_finetunes_and_logs_test_dice(genesis, data, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = _config(data, tmp_path / "ft", init=f"ssl:{genesis.encoder_path}", experiment="ft-genesis",
                  tracking_uri=uri, llrd=0.5, encoder_warmup_steps=1)
    res = run_finetune(cfg, progress=False)
    tr = res.transfer
    assert tr["share"] == 1.0 and tr["n_missing"] == tr["n_mismatched"] == tr["n_unexpected"] == 0
    assert tr["n_matched_decoder"] > 0 and tr["new"] == ["final_conv.weight", "final_conv.bias"]
    assert json.loads((res.out_dir / "transfer_report.json").read_text())["n_matched"] == tr["n_matched"]
    assert 0.0 <= res.test_metrics["dice_mean"] <= 1.0 and {"dice_1", "dice_2"} <= set(res.test_metrics)
    run = MlflowClient(tracking_uri=uri).get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["network"] == "BasicUNet"
    assert run.data.metrics["test_dice_mean"] == pytest.approx(res.test_metrics["dice_mean"])
    assert run.data.params["transfer.share"] == "1.0" and run.data.tags["medssl.init"] == "ssl"
    resolved = FinetuneConfig.from_yaml(res.out_dir / "config.yaml")  # preprocessing from the Genesis recipe
    assert resolved.target_spacing == [1.0, 1.0, 1.0] and resolved.normalisation == "robust"


def test_network_kwargs_scratch_and_ssl(genesis) -> None:
    cfg = dict(network="BasicUNet", roi_size=ROI, experiment=None)
    ssl = f"ssl:{genesis.encoder_path}"
    scratch, recipe, report, _ = build_model(FinetuneConfig(**cfg, network_kwargs={"features": FEATURES}))
    assert report is None and recipe["build"]["kwargs"]["features"] == FEATURES
    assert scratch.conv_0.conv_0.conv.out_channels == FEATURES[0] and scratch.final_conv.out_channels == 3
    # with SSL init the recipe fixes the architecture: equal values pass, contradicting ones are named
    net, _, report, _ = build_model(FinetuneConfig(**cfg, init=ssl, network_kwargs={"features": FEATURES}))
    assert report.share == 1.0
    shapes = {k: v.shape for k, v in scratch.state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
    wide = FEATURES[:4] + [32, FEATURES[5]]
    with pytest.raises(ConfigMismatchError, match="features"):
        build_model(FinetuneConfig(**cfg, init=ssl, network_kwargs={"features": wide}))
    with pytest.raises(ConfigMismatchError, match="bias"):
        build_model(FinetuneConfig(**cfg, init=ssl, network_kwargs={"bias": False}))
    with pytest.raises(ValueError, match="'BasicUNet' does not do classification"):
        FinetuneConfig(network="BasicUNet", task="classification")
    # a Genesis checkpoint cannot initialise another kind: the transfer report says nothing matched
    with pytest.raises(MedsslError, match="no encoder weight matched"):
        seg = cfg | {"network": "SegResNet", "network_kwargs": {"init_filters": 8}}
        build_model(FinetuneConfig(**seg, init=ssl))


def test_cli_refuses_a_checkpoint_that_does_not_fit(genesis, data, tmp_path: Path) -> None:
    from medssl.networks.encoders import build_encoder

    # encoder.pt whose weights are of other features than its recipe says: transfer report + exit 1
    ckpt = torch.load(genesis.encoder_path, weights_only=True)
    other = build_encoder("unet", img_size=ROI, features=FEATURES[:4] + [32, FEATURES[5]])
    ckpt["state_dict"] = other.state_dict()
    torch.save(ckpt, tmp_path / "bad.pt")
    args = ["finetune", "--datalist", str(data[0]), "--splits", str(data[1]), "--fraction", "100",
            "--network", "BasicUNet", "--roi", "32,32,32", "--device", "cpu", "--out", str(tmp_path / "run"),
            "--set", "experiment=null", "--set", "max_steps=1"]
    res = runner.invoke(app, [*args, "--init", f"ssl:{tmp_path / 'bad.pt'}"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "does not fit the BasicUNet" in out and "shape mismatch" in out and "upcat_4." in out
    assert "final_conv.*" in out and "Traceback" not in out
    report = json.loads((tmp_path / "run" / "transfer_report.json").read_text())
    assert report["n_mismatched"] > 0 and report["share"] < 1.0
    # network kwargs that contradict the (good) checkpoint's recipe: refused before any training, field named
    res = runner.invoke(app, [*args, "--init", f"ssl:{genesis.encoder_path}",
                              "--set", "network_kwargs.features=[4,4,8,8,32,4]"])
    assert res.exit_code == 1 and "features" in res.output and "Traceback" not in res.output
