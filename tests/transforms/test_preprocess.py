"""One preprocessing: pretraining, finetuning and a loaded model's recipe give identical tensors for the same
real hippocampus volume; MONAI ``Invertd`` maps a label map on the preprocessed grid back onto the input's
exact shape and affine (also for a volume stored in another orientation)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medssl.deploy.model import load_model
from medssl.engines.finetune.data import eval_transforms
from medssl.engines.pretrain.data import preprocessing
from medssl.errors import MedsslError
from medssl.transforms.preprocess import preprocess_transforms
from tests.deploy._finetuned import finetune_seg

SPACING = [1.25, 1.0, 1.5]


@pytest.fixture(scope="module")
def run(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_seg(hippocampus_dir, tmp_path_factory.mktemp("prep"), target_spacing=SPACING)[1]


@pytest.fixture(scope="module")
def case(hippocampus_dir: Path) -> tuple[Path, Path]:
    image = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[-1]  # not one of the training cases
    return image, hippocampus_dir / "labelsTr" / image.name


@pytest.fixture(scope="module")
def case_las(case: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same case stored flipped along x and y with a matching affine (LPS-like): same anatomy."""
    tmp = tmp_path_factory.mktemp("las")
    out = []
    for path, name in zip(case, ("image.nii.gz", "label.nii.gz"), strict=True):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip), tmp / name)
        out.append(tmp / name)
    return out[0], out[1]


def test_pretraining_finetuning_and_model_recipe_give_identical_tensors(run: Path, case) -> None:
    image, label = case
    prep = load_model(run).preprocessing
    ours = preprocess_transforms(prep, label_key="label")({"image": str(image), "label": str(label)})
    pre = preprocessing(prep["normalisation"], prep["target_spacing"], prep["ct_window"])({"image": str(image)})
    fine = eval_transforms("segmentation", normalisation=prep["normalisation"], target_spacing=SPACING,
                           ct_window=prep["ct_window"], native_label=True)({"image": str(image), "label": str(label)})
    shape = nib.load(str(image)).shape
    expected = [s * 1.0 / t for s, t in zip(shape, SPACING, strict=True)]  # 1 mm native voxels
    assert all(abs(a - b) <= 1 for a, b in zip(ours["image"].shape[1:], expected, strict=True))
    assert ours["image"].dtype == torch.float32
    assert torch.equal(torch.as_tensor(pre["image"]), ours["image"].as_tensor())
    assert torch.equal(fine["image"].as_tensor(), ours["image"].as_tensor())
    assert torch.equal(fine["label"].as_tensor(), ours["label"].as_tensor())
    assert torch.equal(fine["image"].affine, ours["image"].affine)
    assert not isinstance(pre["image"], MetaTensor)  # pretraining caches plain tensors
    assert 0.0 <= float(ours["image"].min()) and float(ours["image"].max()) <= 1.0
    assert set(torch.unique(ours["label"]).tolist()) == {0.0, 1.0, 2.0}


@pytest.mark.parametrize("spacing", [None, SPACING])
def test_invertd_maps_labels_back_to_the_input_grid(case, case_las, spacing) -> None:
    prep = {"task": "segmentation", "target_spacing": spacing, "normalisation": "robust"}
    results = []
    for image, label in (case, case_las):
        tf = preprocess_transforms(prep, label_key="label")
        data = tf({"image": str(image), "label": str(label)})
        assert np.allclose(data["image"].affine[:3, :3].diagonal().numpy() > 0, True)  # RAS after the chain
        data["pred"] = data["label"].clone()  # a "prediction" on the preprocessed grid
        back = Invertd("pred", transform=tf, orig_keys="image", nearest_interp=True)(data)["pred"]
        ref = nib.load(str(label))
        assert tuple(back.shape) == (1, *ref.shape)
        np.testing.assert_allclose(back.affine.numpy(), ref.affine, atol=1e-6)
        truth = np.asanyarray(ref.dataobj)
        got = back[0].numpy()
        if spacing is None:  # orientation only: an exact round trip
            assert np.array_equal(got, truth)
        else:  # resampled twice with nearest: the boundary moves by at most a voxel
            inter = np.logical_and(got > 0, truth > 0).sum()
            assert 2 * inter / ((got > 0).sum() + (truth > 0).sum()) > 0.85
        results.append(data["image"].as_tensor())
    # a volume stored in another orientation is the same tensor after the chain
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_classification_load_false_and_errors(case) -> None:
    image, _ = case
    cls = preprocess_transforms({"task": "classification", "roi_size": [40, 40, 40], "normalisation": "ct",
                                 "ct_window": [0, 500]})({"image": str(image)})["image"]
    assert tuple(cls.shape) == (1, 40, 40, 40) and float(cls.max()) <= 1.0
    loaded = preprocess_transforms({}, track_meta=True, load=False)
    ref = preprocess_transforms({})({"image": str(image)})["image"]
    raw = nib.load(str(image))
    vol = MetaTensor(torch.as_tensor(np.asanyarray(raw.dataobj), dtype=torch.float32)[None],
                     affine=torch.as_tensor(raw.affine))
    assert torch.equal(loaded({"image": vol})["image"].as_tensor(), ref.as_tensor())
    for bad, message in [
        ({"normalisation": "zscore"}, "normalisation must be one of"),
        ({"task": "detection"}, "task must be segmentation|classification"),
        ({"target_spacing": [1, 1]}, "target_spacing must be 3 positive"),
        ({"axcodes": "RA"}, "axcodes must be 3 letters"),
        ({"task": "classification"}, "classification preprocessing needs roi_size"),
        ({"normalisation": "ct", "ct_window": [100, -100]}, "ct_window must be"),
    ]:
        with pytest.raises(MedsslError, match=message):
            preprocess_transforms(bad)
