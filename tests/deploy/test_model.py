"""load_model: a real tiny finetuning run loaded from its checkpoint file, run folder, MLflow ``runs:/`` and
``models:/`` URIs gives the engine's logits; the preprocessing recipe comes from the checkpoint; bad sources
are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.deploy.model import DeployModel, load_model
from medssl.engines.runtime.checkpoint import atomic_save, load_checkpoint
from medssl.errors import MedsslError
from tests.deploy._finetuned import HIPPO_CLASSES, finetune_cls, finetune_seg

SPACING = [1.25, 1.0, 1.5]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def seg(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str):
    return finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("seg"), target_spacing=SPACING,
                        experiment="deploy-model", tracking_uri=mlflow_uri)


def _logits(net: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.rand(1, 1, 24, 32, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net.eval()(x)


def test_checkpoint_file_and_run_folder_give_the_engine_logits(seg) -> None:
    ft, out = seg
    expected = _logits(ft.model)
    for source in (out / "checkpoints" / "best.pt", out, str(out)):
        m = load_model(source)
        assert isinstance(m, DeployModel) and m.source == str(source)
        assert not m.network.training and not any(p.requires_grad for p in m.network.parameters())
        assert torch.equal(_logits(m.network), expected)
    assert m.recipe == load_checkpoint(out / "checkpoints" / "best.pt")["recipe"]


def test_preprocessing_recipe_from_the_checkpoint(seg) -> None:
    ft, out = seg
    prep = load_model(out).preprocessing
    assert prep == {
        "task": "segmentation", "in_channels": 1, "out_channels": 3, "class_names": HIPPO_CLASSES,
        "axcodes": "RAS", "target_spacing": SPACING, "normalisation": "robust", "ct_window": [-1000.0, 1000.0],
        "roi_size": [16, 16, 16], "sw_overlap": 0.25, "sw_batch_size": 4, "flip_axes": [0],
    }
    assert ft.cfg.target_spacing == SPACING  # what the engine used


def test_mlflow_runs_and_models_uris(seg, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    ft, _ = seg
    run_id = ft.tracker.run_id
    expected = _logits(ft.model)
    for uri in (f"runs:/{run_id}", f"runs:/{run_id}/checkpoints", f"runs:/{run_id}/checkpoints/best.pt"):
        assert torch.equal(_logits(load_model(uri, tracking_uri=mlflow_uri).network), expected)
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model("hippo-seg")
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints"
    version = client.create_model_version("hippo-seg", source, run_id=run_id)
    client.set_registered_model_alias("hippo-seg", "champion", version.version)
    for uri in (f"models:/hippo-seg/{version.version}", "models:/hippo-seg@champion"):
        m = load_model(uri, tracking_uri=mlflow_uri)
        assert m.source == uri and torch.equal(_logits(m.network), expected)


def test_classification_checkpoint(medmnist_dir: Path, tmp_path: Path) -> None:
    ft, out = finetune_cls(medmnist_dir, tmp_path)
    m = load_model(out)
    x = torch.rand(2, 1, 28, 28, 28)
    with torch.no_grad():
        assert torch.equal(m.network(x), ft.model.eval()(x))
    p = m.preprocessing
    assert p["task"] == "classification" and p["out_channels"] == 2 and p["normalisation"] == "none"
    assert p["class_names"] == {"0": "class_0", "1": "class_1"} and p["roi_size"] == [28, 28, 28]


def test_bad_sources_are_named(seg, tmp_path: Path, mlflow_uri: str) -> None:
    _, out = seg
    with pytest.raises(MedsslError, match=r"model .*nowhere\.pt not found"):
        load_model(tmp_path / "nowhere.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsslError, match=r"empty: expected checkpoints/best.pt"):
        load_model(tmp_path / "empty")
    ckpt = load_checkpoint(out / "checkpoints" / "best.pt")
    pre = atomic_save({"recipe": {"method": "simclr", "encoder": {}}, "model": {}}, tmp_path / "pre.pt")
    with pytest.raises(MedsslError, match=r"pre\.pt is not a finetune checkpoint"):
        load_model(pre)
    bad = dict(ckpt, model={k: v[:1] for k, v in ckpt["model"].items()})
    atomic_save(bad, tmp_path / "bad.pt")
    with pytest.raises(MedsslError, match=r"bad\.pt: the weights do not fit"):
        load_model(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedsslError, match=r"cannot read checkpoint .*junk\.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(MedsslError, match=r"cannot download model 'runs:/0123456789abcdef'"):
        load_model("runs:/0123456789abcdef", tracking_uri=mlflow_uri)
