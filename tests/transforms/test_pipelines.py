"""Per-method per-sample compositions (medssl/transforms/pipelines.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from medssl.transforms.intensity import NormalizeIntensityRobustd
from medssl.transforms.pipelines import PRESETS, restoration_view, ssl_transforms

EXPECTED = {
    "simclr": {"view1", "view2"},
    "rotation": {"view1", "view1_rot"},
    "mae": {"view1", "view1_target"},  # MAE masks tokens inside the method
    "genesis": {"view1", "view1_target", "view1_mask"},
    "swin": {f"view{i}{s}" for i in (1, 2) for s in ("", "_target", "_mask", "_rot")},
    "spark": {"view1"},  # SparK masks patches inside the method; view1 is its own target
}


def _volume(seed: int = 0, shape=(1, 35, 50, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_contract_keys_collate(method: str) -> None:
    t = ssl_transforms(method, (16, 16, 16), seed=0)
    items = [t({"image": _volume(i, (1, 20 + i, 24, 18))}) for i in range(3)]
    batch = list_data_collate(items)
    expected = EXPECTED.get(method, EXPECTED["simclr"])
    assert set(batch) == expected
    for k, v in batch.items():
        if k.endswith("_rot"):
            assert v.shape == (3,) and v.dtype == torch.long and int(v.max()) < 4
        elif k.endswith("_mask"):
            assert v.shape == (3, 1, 16, 16, 16) and set(v.unique().tolist()) <= {0.0, 1.0}
        else:
            assert v.shape == (3, 1, 16, 16, 16) and v.dtype == torch.float32
    if "view2" in batch:
        assert not torch.equal(batch["view1"], batch["view2"])
    if "view1_target" in batch and method != "mae":  # MAE views are uncorrupted: the method masks tokens
        assert not torch.equal(batch["view1"], batch["view1_target"])


def test_seeded_and_distinct_per_seed() -> None:
    vol = _volume()

    def run(seed: int) -> dict:
        return ssl_transforms("swin", (16, 16, 16), seed=seed)({"image": vol})

    a, b, c = run(3), run(3), run(4)
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    assert not torch.equal(torch.as_tensor(a["view1"]), torch.as_tensor(c["view1"]))


def test_overrides_and_errors() -> None:
    t = ssl_transforms("mae", (16, 16, 16), mask="patch", mask_ratio=0.5, patch_size=(4, 4, 4))
    m = t({"image": _volume()})["view1_mask"]
    assert float(m.mean()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="known"):
        ssl_transforms("jigsaw", (16, 16, 16))
    with pytest.raises(ValueError, match="unknown augmentation option"):
        ssl_transforms("simclr", (16, 16, 16), colour_jitter=0.4)
    with pytest.raises(ValueError):
        ssl_transforms("rotation", (16, 8, 16))  # rotations need a square plane (axes 0, 1)
    with pytest.raises(ValueError):
        restoration_view((16, 16, 16), kind="rotation")
    assert isinstance(ssl_transforms("rotation", (16, 8, 8), rot_axes=(1, 2)), Compose)  # square plane (1, 2)


def test_real_hippocampus_pairs(hippocampus_dir: Path) -> None:
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:4]
    cache = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                     NormalizeIntensityRobustd("image")])
    t = ssl_transforms("swin", (32, 32, 32), seed=0)
    items = [t(cache({"image": str(f)})) for f in files]
    batch = list_data_collate(items)
    assert batch["view1"].shape == (4, 1, 32, 32, 32)
    assert torch.isfinite(batch["view1"]).all()
    assert 0.1 <= float(batch["view1_mask"].mean()) <= 0.35
    assert (batch["view1_target"] >= 0).all() and (batch["view1_target"] <= 1).all()


def test_track_meta_switch_is_scoped() -> None:
    from monai.data import MetaTensor, get_track_meta

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    vol = MetaTensor(_volume(), affine=affine)
    fast = ssl_transforms("rotation", (16, 16, 16), seed=0, track_meta=False)({"image": vol})
    assert type(fast["view1"]) is torch.Tensor and get_track_meta()  # global flag restored
    kept = ssl_transforms("rotation", (16, 16, 16), seed=0, track_meta=True)({"image": vol})
    assert isinstance(kept["view1"], MetaTensor)
    spacing = kept["view1"].affine[:3, :3].abs().sum(0)  # 2 mm voxels, axes permuted by the rotation
    assert torch.allclose(spacing, torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.equal(fast["view1"], kept["view1"].as_tensor())  # same draws, same values
