"""Normalisation and the batched Gaussian blur (medssl/transforms/intensity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, GaussianSmooth, LoadImaged

from medssl.errors import QuarantineError
from medssl.transforms.intensity import (
    HUWindow,
    HUWindowd,
    NormalizeIntensityRobust,
    NormalizeIntensityRobustd,
    gaussian_blur,
)


def _mri(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 20, 24, 16, generator=g) * 300
    x[0, 0, 0, :3] = torch.tensor([1e5, -50.0, 4e4])  # outliers beyond the percentiles
    return x


@pytest.mark.parametrize("mode", ["scale", "zscore"])
def test_scale_invariance(mode: str) -> None:
    norm = NormalizeIntensityRobust(mode=mode)
    x = _mri()
    a, b = norm(x), norm(x * 1e6)
    assert torch.allclose(a, b, atol=1e-4)
    if mode == "scale":
        assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    else:
        assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-3


def test_outliers_are_clipped_and_meta_kept() -> None:
    affine = torch.diag(torch.tensor([1.0, 1.2, 3.0, 1.0], dtype=torch.float64))
    x = MetaTensor(_mri(), affine=affine)
    out = NormalizeIntensityRobustd("image")({"image": x})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine) and out.dtype == torch.float32
    # the 1e5 outlier does not squash the rest of the volume towards 0
    assert float(out.median()) > 0.3


def test_nonzero_statistics_ignore_background() -> None:
    x = torch.zeros(1, 20, 20, 20)
    x[:, 5:15, 5:15, 5:15] = torch.linspace(100, 200, 1000).view(1, 10, 10, 10)
    out = NormalizeIntensityRobust(lower=0, upper=100, nonzero=True)(x)
    assert float(out[:, 5:15, 5:15, 5:15].min()) == 0.0 and float(out.max()) == 1.0


def test_non_finite_quarantined_and_constant_zeroed() -> None:
    x = _mri()
    x[0, 1, 1, 1] = float("nan")
    with pytest.raises(QuarantineError) as e:
        NormalizeIntensityRobust()(x)
    assert e.value.reason == "non_finite"
    assert float(NormalizeIntensityRobust()(torch.full((1, 4, 4, 4), 7.0)).abs().max()) == 0.0
    with pytest.raises(ValueError):
        NormalizeIntensityRobust(lower=60, upper=40)


def test_hu_window() -> None:
    hu = torch.tensor([[[[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]]]])
    assert torch.allclose(HUWindow()(hu), torch.tensor([[[[0.0, 0.0, 0.5, 1.0, 1.0]]]]))
    out = HUWindowd("ct", a_min=-160, a_max=240, b_min=-1, b_max=1)({"ct": hu})["ct"]
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    with pytest.raises(ValueError):
        HUWindow(a_min=10, a_max=0)


def test_gaussian_blur_matches_monai_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 10, 14, generator=g)
    sigma = torch.tensor([[0.3, 0.8, 1.2], [1.0, 1.0, 1.0], [0.25, 1.5, 0.5]])
    out = gaussian_blur(x, sigma)
    for b in range(3):
        ref = GaussianSmooth(sigma=sigma[b].tolist())(x[b])
        assert torch.allclose(out[b], torch.as_tensor(ref), atol=1e-5)


def test_real_hippocampus_volumes_normalise(hippocampus_dir: Path) -> None:
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:6]
    load = LoadImaged("image", image_only=True)
    chan = EnsureChannelFirstd("image")
    norm = NormalizeIntensityRobustd("image")
    for f in files:
        img = chan(load({"image": str(f)}))["image"]
        out = norm({"image": img})["image"]
        assert out.shape == img.shape and out.dtype == torch.float32
        assert float(out.min()) == 0.0 and float(out.max()) == 1.0
        assert torch.equal(out.affine, img.affine)
        assert torch.allclose(norm({"image": img * 1e6})["image"], out, atol=1e-4)


def test_fast_random_smooth_matches_monai_and_noise_keeps_its_distribution() -> None:
    from monai.data import set_track_meta
    from monai.transforms import RandGaussianSmoothd

    from medssl.transforms.intensity import FastRandGaussianNoised, FastRandGaussianSmoothd

    x = torch.rand(1, 12, 10, 14, generator=torch.Generator().manual_seed(0))
    set_track_meta(False)
    try:
        for seed in range(4):
            fast = FastRandGaussianSmoothd("v", sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5), sigma_z=(0.25, 1.5),
                                           prob=0.5).set_random_state(seed)
            ref = RandGaussianSmoothd("v", sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5), sigma_z=(0.25, 1.5),
                                      prob=0.5).set_random_state(seed)
            a, b = fast({"v": x})["v"], ref({"v": x})["v"]
            assert type(a) is torch.Tensor and torch.allclose(a, torch.as_tensor(b), atol=1e-5)
        noise = FastRandGaussianNoised("v", prob=1.0, mean=0.0, std=0.1).set_random_state(0)
        stds = [float((noise({"v": torch.zeros(1, 16, 16, 16)})["v"]).std()) for _ in range(200)]
    finally:
        set_track_meta(True)
    assert 0.04 < sum(stds) / len(stds) < 0.06  # std ~ U(0, 0.1): mean 0.05
    assert min(stds) < 0.01 and max(stds) > 0.09
