"""bundles/finetune_seg and bundles/finetune_cls: `python -m monai.bundle run` trains on tiny real data (hippocampus,
AdrenalMNIST3D) with overrides that really take effect, lands in MLflow where `medssl compare` finds it, and
evaluate.yaml scores a checkpoint exactly like `medssl finetune`'s test evaluation; bad overrides fail with one line
naming the id and the file; metadata.json is valid against the shipped schema."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.bundle_parts import check_overrides, run_bundle
from medssl.errors import MedsslError
from tests.deploy._finetuned import CLS_NET, finetune_cls, finetune_seg

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / "bundles" / "finetune_seg" / "configs"
CLS = REPO / "bundles" / "finetune_cls" / "configs"
CPU = "$torch.device('cpu')"
#: tiny-run overrides, spelled as a user types them (`--key value`)
SEG_TINY = {"max_epochs": 1, "batch_size": 2, "num_samples": 1, "roi_size": "[16,16,16]", "target_spacing": "$None",
            "device": CPU}


def _bundle(configs: list[Path], cwd: Path, **overrides: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str([str(c) for c in configs])]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _metrics_csv(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {row[0]: float(row[1]) for row in csv.reader(f) if row}


@pytest.fixture(scope="module")
def seg_cli(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `medssl finetune` run (SegResNet, 16³, 2 steps) on 6 real hippocampus cases; its datalist and splits are
    in ``<run>/../data``."""
    _, out = finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("seg_cli"))
    return out


@pytest.fixture(scope="module")
def cls_cli(medmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, out = finetune_cls(medmnist_dir, tmp_path_factory.mktemp("cls_cli"))
    return out


def test_seg_train_overrides_mlflow_compare_and_evaluate(seg_cli: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from monai.networks.nets import UNet

    from medssl.tracking.compare import compare_study

    data = seg_cli.parent / "data"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("medssl-finetune", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"medssl.kind": "sweep", "medssl.study": "bundle-study"}).info.run_id
    out = tmp_path / "run"
    net = {"network_def#channels": [8, 16], "network_def#strides": [2]}
    _bundle([SEG / "train.yaml"], tmp_path, meta_file=str(SEG / "metadata.json"), datalist=str(data / "datalist.json"),
            splits=str(data / "splits.json"), output_dir=str(out), tracking_uri=uri, study="bundle-study",
            parent_run_id=parent, **{"optimizer#lr": 0.005}, **net, **SEG_TINY)
    # the channels override built the network: the checkpoint loads strictly into that UNet only
    state = torch.load(out / "checkpoints" / "model.pt", map_location="cpu", weights_only=True)
    UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[8, 16], strides=[2], num_res_units=2).load_state_dict(state)
    with pytest.raises(RuntimeError):
        UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[32, 64, 128, 256], strides=[2, 2, 2],
             num_res_units=2).load_state_dict(state)
    # one FINISHED run with medssl's tags, child of the sweep parent; the optimizer lr override was used
    runs = client.search_runs([exp], filter_string="tags.`medssl.source` = 'bundle'")
    assert len(runs) == 1
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["medssl.kind"] == "finetune" and tags["medssl.study"] == "bundle-study"
    assert (tags["medssl.fraction"], tags["medssl.init"], tags["medssl.seed"]) == ("100", "scratch", "0")
    assert tags["mlflow.parentRunId"] == parent and tags["medssl.network"] == "UNet"
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr_group_0")]
    # logged after each scheduler step: cosine at step 1 of 2 = lr / 2 (the default lr 1e-3 would give 5e-4)
    assert lrs[0] == pytest.approx(0.005 / 2)
    assert {"val_dice_mean", "test_dice_mean", "test_hd95_mean", "train_loss"} <= set(run.data.metrics)
    # `medssl compare` sees the bundle run as the study's (100 %, scratch, seed 0) cell
    res = compare_study("bundle-study", tracking_uri=uri, out_dir=tmp_path / "compare", log_to_parent=False)
    [rec] = res.records
    assert rec["run_id"] == run.info.run_id and rec["status"] == "ok"
    assert rec["value"] == pytest.approx(run.data.metrics["test_dice_mean"])
    # evaluate.yaml on the bundle's own checkpoint (state dict into network_def) = the run's test metrics
    _bundle([SEG / "train.yaml", SEG / "evaluate.yaml"], tmp_path, datalist=str(data / "datalist.json"),
            splits=str(data / "splits.json"), output_dir=str(out), **net, **SEG_TINY)
    got = _metrics_csv(out / "eval" / "metrics.csv")
    assert got["dice_mean"] == pytest.approx(run.data.metrics["test_dice_mean"], abs=1e-6)


def test_seg_evaluate_equals_cli_evaluation(seg_cli: Path, tmp_path: Path) -> None:
    data = seg_cli.parent / "data"
    want = json.loads((seg_cli / "results.json").read_text())["test_metrics"]
    _bundle([SEG / "train.yaml", SEG / "evaluate.yaml"], tmp_path, datalist=str(data / "datalist.json"),
            splits=str(data / "splits.json"), output_dir=str(tmp_path / "ev"),
            ckpt_path=str(seg_cli / "checkpoints" / "best.pt"), sw_overlap=0.25, **SEG_TINY)
    got = _metrics_csv(tmp_path / "ev" / "eval" / "metrics.csv")
    assert want["cases"] >= 1
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_seg_evaluate_refuses_other_preprocessing(seg_cli: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(SEG / "train.yaml"), str(SEG / "evaluate.yaml")])
    parser.update({"ckpt_path": str(seg_cli / "checkpoints" / "best.pt"), "roi_size": [16, 16, 16], "device": CPU})
    with pytest.raises(RuntimeError) as e:  # the recipe trained on the native grid, the bundle asks for 1 mm
        parser.get_parsed_content("network")
    assert "target_spacing" in repr(e.value.__cause__)


def test_loss_swap_takes_effect(seg_cli: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser
    from monai.losses import DiceFocalLoss

    data = seg_cli.parent / "data"
    overrides = {"loss#_target_": "DiceFocalLoss", "loss#lambda_focal": 2.0, "datalist": str(data / "datalist.json"),
                 "output_dir": str(tmp_path / "out"),  # the trainer's handlers make folders: never in the cwd
                 "splits": str(data / "splits.json"), "roi_size": [16, 16, 16], "device": CPU,
                 "network_def#channels": [8, 16], "network_def#strides": [2]}
    check_overrides(SEG / "train.yaml", overrides)
    parser = ConfigParser()
    parser.read_config(str(SEG / "train.yaml"))
    parser.update(overrides)
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.loss_function, DiceFocalLoss) and trainer.loss_function.lambda_focal == 2.0
    assert tuple(trainer.network.channels) == (8, 16)


@pytest.mark.parametrize(("override", "words"), [
    ({"optimiser#lr": 1e-4}, ["key 'optimiser#lr' does not exist", "did you mean 'optimizer#lr'?"]),
    ({"optimizer#lrr": 1e-4}, ["key 'optimizer#lrr' does not exist", "AdamW has no argument 'lrr'", "did you mean 'optimizer#lr'?"]),
    ({"loss#_target_": "NoSuchLoss"}, ["unknown _target_ 'NoSuchLoss' at key 'loss'"]),
    ({"network_def": {"_target_": "medssl.nope.Net"}}, ["unknown _target_ 'medssl.nope.Net' at key 'network_def'"]),
])
def test_bad_override_names_key_and_file(override: dict, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(MedsslError) as e:
        run_bundle(SEG / "train.yaml", output_dir=str(tmp_path / "never"), **override)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{SEG / 'train.yaml'}: ")
    for w in words:
        assert w in msg
    assert not (tmp_path / "never").exists()  # refused before anything ran


def test_cls_train_and_evaluate_equals_cli(cls_cli: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    data = cls_cli.parent
    common = {"datalist": str(data / "datalist.json"), "splits": str(data / "splits.json"), "normalisation": "none",
              "batch_size": 4, "device": CPU}
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    run_bundle(CLS / "train.yaml", meta_file=CLS / "metadata.json", logging_file=CLS / "logging.conf",
               output_dir=str(out), max_epochs=2, tracking_uri=uri, **{"network_def#network_kwargs": CLS_NET},
               **common)
    assert (out / "checkpoints" / "model.pt").is_file()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("medssl-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medssl.task"] == "classification"
    assert {"val_auc", "test_auc", "test_accuracy"} <= set(run.data.metrics)
    want = json.loads((cls_cli / "results.json").read_text())["test_metrics"]
    _bundle([CLS / "train.yaml", CLS / "evaluate.yaml"], tmp_path, output_dir=str(tmp_path / "ev"),
            ckpt_path=str(cls_cli / "checkpoints" / "best.pt"), **common)
    got = _metrics_csv(tmp_path / "ev" / "eval" / "metrics.csv")
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("bundle", ["finetune_seg", "finetune_cls"])
def test_metadata_valid_against_shipped_schema(bundle: str, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    schema = REPO / "bundles" / "schema" / "metadata_schema.json"
    meta = REPO / "bundles" / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(schema))  # present: no download
    broken = json.loads(meta.read_text())
    del broken["network_data_format"]["outputs"]["pred"]["num_channels"]
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'num_channels' is a required property"):  # MONAI re-raises ValidationError
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(schema))


def test_variant_files_override_existing_ids_only() -> None:
    import yaml

    for configs in (SEG, CLS):
        base = yaml.safe_load((configs / "train.yaml").read_text())
        evaluate = yaml.safe_load((configs / "evaluate.yaml").read_text())
        new = {k for k in evaluate if k.split("#")[0] not in base}
        assert new <= {"ckpt_path", "eval_role", "eval_dir"}, new


def test_ssl_encoder_network_swap_loads_the_pretrained_weights(tmp_path: Path) -> None:
    """`network_def` swapped in YAML for medssl's builder with an SSL init: medssl's transfer loads the encoder
    (a MONAI-UNet SSL encoder: encoder and decoder; only the top up block `model.2` is new)."""
    from monai.bundle import ConfigParser

    from medssl.networks.encoders import build_encoder

    tiny = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2}
    torch.manual_seed(3)
    enc = build_encoder("monai_unet", in_channels=1, img_size=(16, 16, 16), **tiny)
    path = tmp_path / "encoder.pt"
    torch.save({"recipe": {"encoder": enc.recipe, "in_channels": 1}, "state_dict": enc.state_dict()}, path)
    swap = {"network_def": {"_target_": "medssl.bundle_parts.finetune_network", "network": "UNet",
                            "init": f"ssl:{path}", "out_channels": "@out_channels", "in_channels": "@in_channels",
                            "roi_size": "@roi_size", "network_kwargs": tiny},
            "roi_size": [16, 16, 16], "target_spacing": None}
    check_overrides(SEG / "train.yaml", swap)
    parser = ConfigParser()
    parser.read_config(str(SEG / "train.yaml"))
    parser.update(swap)
    net = parser.get_parsed_content("network_def")
    state, pre = net.state_dict(), enc.net.state_dict()
    body = [k for k in state if not k.startswith("model.2.")]
    assert body and all(torch.equal(state[k], pre[k]) for k in body)
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
