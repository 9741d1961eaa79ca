"""Export of a tiny real finetuned SegResNet (hippocampus) and ResNet classifier: TorchScript and ONNX within
1e-4 of the eager logits on a real volume (ROI and another whole-volume shape), recipe embedded and read back,
an unexportable module named, the CLI; GroupNorm / InstanceNorm statistics in the ONNX graph as accurate as
torch's fp32 (a trained SegResNet-8 that failed the gate at 4e-4 passes), and predict's ONNX backend agrees."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from monai.transforms import ResizeWithPadOrCrop
from typer.testing import CliRunner

from medssl.cli import app
from medssl.deploy.export import MAX_ABS_DIFF, export_model, export_network, load_exported
from medssl.deploy.model import load_model
from medssl.deploy.onnx_norm import CascadedGroupNorm, cascade_norms
from medssl.deploy.predict import predict
from medssl.errors import MedsslError
from medssl.transforms.preprocess import preprocess_transforms
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


def test_cascaded_group_norm_is_group_norm() -> None:
    """The same function as ``nn.GroupNorm`` / ``nn.InstanceNorm3d`` (fp64: to round-off), in a copy of the net."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 6, 7, generator=g, dtype=torch.float64) * 3 + 2
    gn = torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 2.0, generator=g), gn.bias.uniform_(-1.0, 1.0, generator=g)
    net = torch.nn.Sequential(torch.nn.Conv3d(8, 8, 1), gn, torch.nn.InstanceNorm3d(8)).double().eval()
    cn, counts = cascade_norms(net)
    assert counts == {"GroupNorm": 1, "InstanceNorm3d": 1} and isinstance(cn[1], CascadedGroupNorm)
    assert isinstance(net[1], torch.nn.GroupNorm) and isinstance(cn[2], CascadedGroupNorm)  # original untouched
    with torch.no_grad():
        assert (cn(x) - net(x)).abs().max() < 1e-12
    assert cascade_norms(torch.nn.BatchNorm3d(2))[1] == {}
    with pytest.raises(ValueError, match="multiple of num_groups"):
        CascadedGroupNorm(3, 8)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_norm_of_a_large_real_group_in_onnx_keeps_fp32_accuracy(norm: str, hippocampus_dir: Path,
                                                                 tmp_path: Path) -> None:
    """One norm layer over a real volume padded to 64³ (a 262,144-voxel group): ONNX Runtime's own
    InstanceNormalization is ~7e-4 from fp64 here (torch 4e-7); the exported graph must stay within 1e-5."""
    prep = {"task": "segmentation", "in_channels": 1, "axcodes": "RAS", "target_spacing": None,
            "normalisation": "robust", "roi_size": [32, 32, 32]}
    vol = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[0]
    x = torch.as_tensor(ResizeWithPadOrCrop([64, 64, 64])(preprocess_transforms(prep)({"image": str(vol)})["image"]))
    x = x.float().as_subclass(torch.Tensor)[None]  # (1, 1, 64, 64, 64)
    layer = torch.nn.GroupNorm(1, 1) if norm == "group" else torch.nn.InstanceNorm3d(1, affine=True)
    with torch.no_grad():
        layer.weight.fill_(1.5), layer.bias.fill_(-0.25)
        ref = layer.double()(x.double())
    run, _ = load_exported(export_network(layer.float().eval(), x, "onnx", tmp_path / "norm.onnx",
                                          {"preprocessing": {}}))
    assert (run(x).double() - ref).abs().max() <= 1e-5
    assert run(x[..., :40, :48]).shape == (1, 1, 64, 40, 48)  # dynamic spatial axes kept


@pytest.fixture(scope="module")
def seg8(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A SegResNet with 8 filters and 8-group GroupNorm trained 10 steps on real 32³ crops. Before the norms
    were cascaded its ONNX export was 7e-5 to 4e-4 from eager (3.96e-4 and argmax 0.999985 failing the gate;
    four trainings: they are not bit-reproducible); cascaded: 9e-7 to 4e-6."""
    tmp = tmp_path_factory.mktemp("export8")
    _, run = finetune_seg(hippocampus_dir, tmp, network_kwargs={"init_filters": 8, "blocks_down": [1, 1],
                          "blocks_up": [1]}, roi_size=[32, 32, 32], max_steps=10)
    return run, export_model(run, tmp / "export", formats=["onnx"])


def test_trained_group_norm_segresnet_passes_the_gate(seg8) -> None:
    run, res = seg8
    c = res.checks["onnx"]
    assert c["passed"] and c["max_abs_diff"] <= MAX_ABS_DIFF and c["argmax_agreement"] >= 0.9999
    assert c["max_abs_diff"] <= MAX_ABS_DIFF / 5  # fp32 noise, not just under the gate (docstring's numbers)
    assert c["inputs"]["other_shape"]["shape"] == [2, 3, 64, 32, 32]
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in load_model(run).network.modules())
    assert c["cascaded_norms"] == {"GroupNorm": n_norms} and n_norms > 0
    assert json.loads(res.check_path.read_text())["checks"]["onnx"]["cascaded_norms"] == c["cascaded_norms"]
    ops = {n.op_type for n in onnx.load(str(res.files["onnx"])).graph.node}
    assert not ops & {"InstanceNormalization", "GroupNormalization"}, ops


def test_predict_onnx_runs_the_checked_graph(seg8, hippocampus_dir: Path, tmp_path: Path) -> None:
    """``medssl predict --backend onnx`` loads the very file and session the check ran: its labels on a real
    volume equal the torch backend's."""
    run, res = seg8
    vol = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[-1]
    got = {b: predict(src, [vol], tmp_path / b, backend=b) for b, src in (("onnx", res.files["onnx"]),
                                                                            ("torch", run))}
    assert json.loads(got["onnx"].report_path.read_text())["model"] == str(res.files["onnx"])
    seg = {b: np.asarray(nib.load(next((tmp_path / b).glob("*_seg.nii.gz"))).dataobj) for b in got}
    assert seg["onnx"].shape == nib.load(vol).shape and np.array_equal(seg["onnx"], seg["torch"])
