"""`medssl predict` on real volumes: a tiny real finetuned model on hippocampus MRI (also reoriented out of RAS)
against a direct MONAI sliding-window inference + inverse; the hand-set threshold model on real CT/MR for exact
geometry (resampling, LPS input); bad inputs reported and skipped; TTA only along the recipe's axes; the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from typer.testing import CliRunner

from medssl.cli import app
from medssl.deploy.model import DeployModel, load_model
from medssl.deploy.predict import predict, predict_probabilities, tta_flips
from medssl.errors import MedsslError
from medssl.transforms.preprocess import preprocess_transforms
from tests.deploy._finetuned import finetune_seg
from tests.deploy._threshold import expected_labels, threshold_model


@pytest.fixture(scope="module")
def seg_run(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step SegResNet finetuning on real hippocampus volumes (augmentation flips axis 0 only)."""
    _, out = finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("ft"))
    return out


@pytest.fixture(scope="module")
def model(seg_run: Path) -> DeployModel:
    return load_model(seg_run)


@pytest.fixture(scope="module")
def volumes(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real hippocampus volume (not a training case of `seg_run`) and a copy reoriented to P-I-L (axes
    permuted and flipped: not RAS) with nibabel."""
    src = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[20]
    tmp = tmp_path_factory.mktemp("vols")
    img = nib.load(src)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("PIL"))
    nib.save(img.as_reoriented(ornt), tmp / "pil_case.nii.gz")
    return src, tmp / "pil_case.nii.gz"


def reference_probs(m: DeployModel, path: Path, flips: tuple[tuple[int, ...], ...] = ()) -> np.ndarray:
    """MONAI directly: LoadImaged chain → ``sliding_window_inference`` (+ flips) → softmax → Invertd."""
    prep = m.preprocessing
    chain = preprocess_transforms(prep)
    d = chain({"image": str(path)})
    x = d["image"][None]

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = sliding_window_inference(inp, prep["roi_size"], prep["sw_batch_size"], m.network,
                                              overlap=prep["sw_overlap"], mode="gaussian")
        return torch.softmax(logits, 1)

    p = run(x)
    for dims in flips:
        p = p + torch.flip(run(torch.flip(x, dims)), dims)
    d["pred"] = (p / (1 + len(flips)))[0]
    return np.asarray(Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(d)["pred"])


def _load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_nifti_matches_direct_inference_and_input_geometry(model: DeployModel, volumes, tmp_path: Path) -> None:
    ras, pil = volumes
    res = predict(model, [ras, pil], tmp_path, probabilities=True)
    assert res.exit_code == 0 and [c["case"] for c in res.ok] == ["hippocampus_" + ras.name[12:15], "pil_case"]
    ref = reference_probs(model, ras)
    for case, src in zip(res.ok, (ras, pil), strict=True):
        seg, affine = _load(case["outputs"]["seg"])
        img = nib.load(src)
        assert seg.shape == img.shape and seg.dtype == np.uint8
        assert np.allclose(affine, img.affine, atol=1e-5)
        prob, _ = _load(case["outputs"]["prob"])
        assert prob.shape == (*img.shape, 3)
        assert np.allclose(prob.sum(-1), 1.0, atol=1e-5)  # a probability map
        assert np.array_equal(seg, prob.argmax(-1))
        unc, _ = _load(case["outputs"]["uncertainty"])
        assert unc.min() >= 0.0 and unc.max() <= 1.0 + 1e-6
    prob_ras, _ = _load(res.ok[0]["outputs"]["prob"])
    assert np.allclose(prob_ras, np.moveaxis(ref, 0, -1), atol=1e-5)
    assert np.array_equal(_load(res.ok[0]["outputs"]["seg"])[0], ref.argmax(0))
    # the P-I-L copy predicts the same volume: back in RAS it equals the RAS prediction voxel by voxel
    pil_seg = nib.load(res.ok[1]["outputs"]["seg"])
    back = nib.orientations.ornt_transform(nib.io_orientation(pil_seg.affine), nib.orientations.axcodes2ornt("RAS"))
    assert np.array_equal(np.asarray(pil_seg.as_reoriented(back).dataobj), _load(res.ok[0]["outputs"]["seg"])[0])
    report = json.loads(res.report_path.read_text())
    assert report["ok"] == 2 and report["failed"] == 0 and report["tta"] is False


def test_tta_flips_only_recipe_axes(model: DeployModel, volumes, tmp_path: Path) -> None:
    assert model.preprocessing["flip_axes"] == [0]
    assert tta_flips([0]) == [(2,)] and tta_flips([]) == []
    assert tta_flips([2, 0]) == [(2,), (4,), (2, 4)]
    with pytest.raises(MedsslError, match="0..2"):
        tta_flips([3])
    seen: list[torch.Tensor] = []

    def spy(inp: torch.Tensor, runner) -> torch.Tensor:
        seen.append(inp.clone())
        return runner(inp)

    x = torch.rand(1, 1, 16, 16, 16)
    predict_probabilities(x, model.network, spy, tta_flips(model.preprocessing["flip_axes"]))
    assert len(seen) == 2 and torch.equal(seen[0], x) and torch.equal(seen[1], torch.flip(x, (2,)))
    ras, _ = volumes
    res = predict(model, [ras], tmp_path, tta=True, probabilities=True)
    prob, _ = _load(res.ok[0]["outputs"]["prob"])
    assert np.allclose(prob, np.moveaxis(reference_probs(model, ras, flips=((2,),)), 0, -1), atol=1e-5)
    assert not np.allclose(prob, np.moveaxis(reference_probs(model, ras), 0, -1), atol=1e-5)
    assert json.loads(res.report_path.read_text())["tta_flips"] == [[0]]


def test_threshold_model_exact_geometry(totalseg_dir: Path, tmp_path: Path) -> None:
    """Real CT resampled to 4.5 mm and back; a real LPS MR on its native grid: exact labels."""
    ct, mr = totalseg_dir / "example_ct_sm.nii.gz", totalseg_dir / "example_mr_sm.nii.gz"
    res = predict(threshold_model(target_spacing=[4.5, 4.5, 4.5]), [ct], tmp_path / "ct", probabilities=True)
    seg, affine = _load(res.ok[0]["outputs"]["seg"])
    hu, ct_affine = _load(ct)
    assert seg.shape == hu.shape and np.allclose(affine, ct_affine, atol=1e-5)
    assert (seg == expected_labels(hu.astype(float))).mean() > 0.85  # 3 → 4.5 → 3 mm blurs class borders
    assert np.allclose(_load(res.ok[0]["outputs"]["prob"])[0].sum(-1), 1.0, atol=1e-4)
    res = predict(threshold_model(), [mr], tmp_path / "mr")
    seg, affine = _load(res.ok[0]["outputs"]["seg"])
    raw, mr_affine = _load(mr)
    assert nib.aff2axcodes(mr_affine) == ("L", "P", "S")
    assert np.allclose(affine, mr_affine, atol=1e-5)
    assert np.array_equal(seg, expected_labels(raw.astype(float)))


def test_bad_inputs_reported_and_skipped_cli(seg_run: Path, volumes, tmp_path: Path, monkeypatch) -> None:
    """A truncated NIfTI, a text file and a missing path among good files: reported with reasons, the good
    ones written, exit code 1, one model load for the batch."""
    ras, pil = volumes
    bad = tmp_path / "in" / "truncated.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(ras.read_bytes()[: ras.stat().st_size // 2])
    shutil.copy(ras, tmp_path / "in" / "good.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    import medssl.deploy.model as model_mod

    loads = []
    real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(seg_run), str(tmp_path / "in"), str(pil),
                                      str(tmp_path / "notes.txt"), str(tmp_path / "missing.nii.gz"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert len(loads) == 1
    assert "truncated_file" in result.output and "predict_report.json" in result.output
    report = json.loads((out / "predict_report.json").read_text())
    status = {Path(c["input"]).name: (c["status"], c.get("reason")) for c in report["cases"]}
    assert status == {"good.nii.gz": ("ok", None), "pil_case.nii.gz": ("ok", None),
                      "truncated.nii.gz": ("failed", "truncated_file"), "notes.txt": ("failed", "no_image"),
                      "missing.nii.gz": ("failed", "not_found")}
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["good_seg.nii.gz", "pil_case_seg.nii.gz"]


def test_refuses_classification_and_bad_backend(model: DeployModel, volumes, tmp_path: Path) -> None:
    cls = DeployModel(network=model.network, recipe={}, preprocessing=model.preprocessing | {"task": "classification"},
                      source="cls.pt")
    with pytest.raises(MedsslError, match="cls.pt.*segmentation model"):
        predict(cls, [volumes[0]], tmp_path)
    with pytest.raises(MedsslError, match="backend"):
        predict(model, [volumes[0]], tmp_path, backend="tensorrt")


def test_exported_backends_give_the_same_labels(model: DeployModel, volumes, tmp_path: Path) -> None:
    """TorchScript and ONNX Runtime files of the same network (D1's `export_network`, recipe embedded) predict
    the torch labels: identical wherever torch's top-2 probability margin exceeds float noise (1e-4)."""
    from medssl.deploy.export import export_network

    ras, pil = volumes
    example = torch.rand(1, 1, *model.preprocessing["roi_size"])
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        export_network(model.network, example, fmt, tmp_path / "export" / name, {"preprocessing": model.preprocessing})
    ref = predict(model, [ras, pil], tmp_path / "torch", probabilities=True)
    for backend in ("torchscript", "onnx"):
        res = predict(tmp_path / "export", [ras, pil], tmp_path / backend, backend=backend, probabilities=True)
        assert res.exit_code == 0 and json.loads(res.report_path.read_text())["backend"] == backend
        for got, want in zip(res.ok, ref.ok, strict=True):
            p_want = _load(want["outputs"]["prob"])[0]
            assert np.allclose(_load(got["outputs"]["prob"])[0], p_want, atol=1e-4), backend
            top2 = np.sort(p_want, axis=-1)[..., -2:]
            clear = top2[..., 1] - top2[..., 0] > 1e-4
            assert clear.mean() > 0.99
            seg_got, seg_want = _load(got["outputs"]["seg"])[0], _load(want["outputs"]["seg"])[0]
            assert np.array_equal(seg_got[clear], seg_want[clear]), backend


@pytest.fixture(scope="module")
def second_run(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny real run on the same cases: other window (24×16×16) and other trained flip axis (1)."""
    _, out = finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("ft2"), roi_size=[24, 16, 16],
                          augment={"flip_axes": [1]})
    return out


def test_ensemble_averages_members_with_their_own_windows_and_flips(model: DeployModel, second_run: Path, volumes,
                                                                    tmp_path: Path) -> None:
    """Two real models: the ensemble's probabilities are the mean of each member's own MONAI reference (its own
    window and its own test-time flip), its labels their argmax, on the input's grid; the report names both."""
    other = load_model(second_run)
    assert other.preprocessing["roi_size"] == [24, 16, 16] and other.preprocessing["flip_axes"] == [1]
    ras, pil = volumes
    res = predict([model, other], [ras, pil], tmp_path, tta=True, probabilities=True)
    assert res.exit_code == 0
    want = (reference_probs(model, ras, flips=((2,),)) + reference_probs(other, ras, flips=((3,),))) / 2
    prob, affine = _load(res.ok[0]["outputs"]["prob"])
    assert np.allclose(prob, np.moveaxis(want, 0, -1), atol=1e-5)
    seg = _load(res.ok[0]["outputs"]["seg"])[0]
    assert np.array_equal(seg, want.argmax(0)) and np.allclose(affine, nib.load(ras).affine, atol=1e-5)
    # not just one member's output
    assert not np.allclose(prob, np.moveaxis(reference_probs(model, ras, flips=((2,),)), 0, -1), atol=1e-3)
    assert nib.load(res.ok[1]["outputs"]["seg"]).shape == nib.load(pil).shape
    report = json.loads(res.report_path.read_text())
    assert report["model"] == [model.source, other.source]
    assert [m["roi_size"] for m in report["ensemble"]] == [[16, 16, 16], [24, 16, 16]]
    assert [m["tta_flips"] for m in report["ensemble"]] == [[[0]], [[1]]]


def test_ensemble_refuses_members_that_preprocess_differently(model: DeployModel, volumes, tmp_path: Path) -> None:
    import dataclasses

    ras, _ = volumes
    coarse = dataclasses.replace(model, source="coarse.pt",
                                 preprocessing=model.preprocessing | {"target_spacing": [2.0, 2.0, 2.0]})
    with pytest.raises(MedsslError, match=r"ensemble: model coarse.pt has target_spacing=\[2.0, 2.0, 2.0\]"):
        predict([model, coarse], [ras], tmp_path / "a")
    renamed = dataclasses.replace(model, source="renamed.pt", preprocessing=model.preprocessing | {
        "class_names": {"0": "background", "1": "head", "2": "tail"}})
    with pytest.raises(MedsslError, match="class_names"):
        predict([model, renamed], [ras], tmp_path / "b")
    with pytest.raises(MedsslError, match="no model"):
        predict([], [ras], tmp_path / "c")
    assert not (tmp_path / "a").exists()  # refused before any output


def test_ensemble_cli(seg_run: Path, second_run: Path, volumes, tmp_path: Path) -> None:
    ras, _ = volumes
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(seg_run), str(ras), "--out", str(out),
                                      "--ensemble", str(second_run)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "predict_report.json").read_text())
    assert report["model"] == [str(seg_run), str(second_run)] and report["ok"] == 1
    lib = predict([seg_run, second_run], [ras], tmp_path / "lib")
    name = Path(lib.ok[0]["outputs"]["seg"]).name
    assert np.array_equal(_load(out / name)[0], _load(lib.ok[0]["outputs"]["seg"])[0])
