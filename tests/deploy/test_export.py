"""Export of a tiny real finetuned SegResNet (hippocampus) and ResNet classifier: TorchScript and ONNX within
1e-4 of the eager logits on a real volume (ROI and another whole-volume shape), recipe embedded and read back,
an unexportable module named, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from medssl.cli import app
from medssl.deploy.export import MAX_ABS_DIFF, export_model, export_network, load_exported
from medssl.deploy.model import load_model
from medssl.errors import MedsslError
from tests.deploy._finetuned import finetune_cls, finetune_seg


@pytest.fixture(scope="module")
def seg(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("export")
    _, run = finetune_seg(hippocampus_dir, tmp, target_spacing=[1.25, 1.0, 1.5])
    return run, export_model(run, tmp / "export")


def test_both_formats_match_eager_on_a_real_volume(seg) -> None:
    run, res = seg
    assert set(res.files) == {"torchscript", "onnx"}
    saved = json.loads(res.check_path.read_text())
    assert saved["checks"] == json.loads(json.dumps(res.checks)) and Path(saved["volume"]).is_file()
    for c in res.checks.values():
        assert c["passed"] and c["max_abs_diff"] <= MAX_ABS_DIFF and c["argmax_agreement"] >= 0.9999
        assert c["inputs"]["roi"]["shape"][2:] == [16, 16, 16]
        assert c["inputs"]["other_shape"]["shape"] == [2, 3, 32, 16, 16]  # logits: dynamic batch, spatial axes
    # each export runs on yet another size and batch and gives the eager logits
    m = load_model(run)
    x = torch.rand(2, 1, 24, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = m.network(x)
    for fmt, path in res.files.items():
        runner, prep = load_exported(path)
        assert prep == m.preprocessing, fmt
        assert (runner(x) - eager).abs().max() <= MAX_ABS_DIFF, fmt


def test_recipe_embedded_and_opset_recorded(seg) -> None:
    run, res = seg
    recipe = json.loads(res.recipe_path.read_text())
    assert recipe["preprocessing"] == load_model(run).preprocessing
    assert recipe["class_names"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert {"medssl", "monai", "torch", "onnx", "onnxruntime"} <= set(recipe["versions"])
    proto = onnx.load(str(res.files["onnx"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["medssl.recipe"]) == recipe
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert res.checks["onnx"]["opset"] == 18 and res.checks["torchscript"]["method"] == "script"
    extra = {"recipe.json": ""}
    torch.jit.load(str(res.files["torchscript"]), _extra_files=extra)
    assert json.loads(extra["recipe.json"]) == recipe
    exp = load_exported(res.files["onnx"].parent, backend="onnx")
    assert exp.format == "onnx" and exp.source == str(res.files["onnx"])
    with pytest.raises(MedsslError, match="is onnx, not torchscript"):
        load_exported(res.files["onnx"], backend="torchscript")
    with pytest.raises(MedsslError, match="no embedded medssl recipe"):
        plain = res.files["onnx"].parent / "plain.ts"
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
        load_exported(plain)


class _Quirk(torch.nn.Module):
    """Leaves torch for NumPy: neither TorchScript nor torch.export can follow it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().numpy() * 2.0)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.ReLU(), _Quirk())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_unexportable_module_is_named(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match=r"cannot export _Net to .*blocked by module body\.1 \(_Quirk\)"):
        export_network(_Net().eval(), torch.rand(1, 1, 8, 8, 8), fmt, tmp_path / "m", {})


def test_classification_export(medmnist_dir: Path, tmp_path: Path) -> None:
    _, run = finetune_cls(medmnist_dir, tmp_path)
    res = export_model(run, tmp_path / "export")
    assert all(c["passed"] for c in res.checks.values()) and set(res.checks) == {"torchscript", "onnx"}
    assert list(res.checks["onnx"]["inputs"]) == ["roi"]
    runner, prep = load_exported(res.files["onnx"])
    assert prep["task"] == "classification" and runner(torch.rand(3, 1, 28, 28, 28)).shape == (3, 2)


def test_cli_export(seg, hippocampus_dir: Path, tmp_path: Path) -> None:
    run, _ = seg
    volume = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[-1]
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "cli"), "--format",
                                      "torchscript", "--volume", str(volume)])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output and (tmp_path / "cli" / "model.ts").is_file()
    assert json.loads((tmp_path / "cli" / "export_check.json").read_text())["volume"] == str(volume)
    bad = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "x"), "--format", "tensorrt"])
    assert bad.exit_code == 1 and "unknown export format" in bad.output
    missing = CliRunner().invoke(app, ["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 1 and "not found" in missing.output
