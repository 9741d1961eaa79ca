"""Batched on-device augmentation (medssl/transforms/batched.py), incl. agreement with the per-sample path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Resize, SpatialCrop

from medssl.transforms.batched import BatchedSSLAugment, crop_batch
from medssl.transforms.pipelines import PRESETS, ssl_transforms
from medssl.transforms.spatial import rotate
from medssl.transforms.views import box_overlap

ROI = (16, 16, 16)


def _volumes(n: int = 4, shape=(1, 24, 28, 20), seed: int = 0) -> list[torch.Tensor]:
    """Smooth random volumes in [0, 1] (low-res noise upsampled), so blur and crops change statistics."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(1, 1, 6, 7, 5, generator=g)
        out.append(F.interpolate(low, size=shape[1:], mode="trilinear", align_corners=True)[0])
    return out


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_for_method_keys_match_per_sample(method: str) -> None:
    vols = _volumes(3)
    aug = BatchedSSLAugment.for_method(method, ROI, seed=0)
    out = aug(torch.stack(vols))
    per_sample = ssl_transforms(method, ROI, seed=0)({"image": vols[0]})
    assert set(out) == set(per_sample)
    for k, v in out.items():
        assert v.shape[0] == 3 and v.device == vols[0].device
        if k.endswith("_rot"):
            assert v.dtype == torch.long and v.ndim == 1
        else:
            assert v.shape[1:] == tuple(per_sample[k].shape) and v.dtype == torch.float32


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="simclr"):
        BatchedSSLAugment.for_method("jigsaw", ROI)
    with pytest.raises(ValueError, match="unknown augmentation option"):
        BatchedSSLAugment.for_method("simclr", ROI, hue=0.1)


def test_seeded_and_state_dict_restores_stream() -> None:
    x = torch.stack(_volumes(4))
    a = BatchedSSLAugment.for_method("swin", ROI, seed=5)
    b = BatchedSSLAugment.for_method("swin", ROI, seed=5)
    first_a, first_b = a(x), b(x)
    for k in first_a:
        assert torch.equal(first_a[k], first_b[k])
    state = a.state_dict()
    nxt = a(x)
    assert not torch.equal(nxt["view1"], first_a["view1"])
    b.load_state_dict(state)
    again = b(x)
    for k in nxt:
        assert torch.equal(nxt[k], again[k])
    other = BatchedSSLAugment.for_method("swin", ROI, seed=6)(x)
    assert not torch.equal(other["view1"], first_a["view1"])


def test_list_of_sizes_crops_from_centred_padding() -> None:
    vols = [torch.rand(1, 10, 20, 18), torch.rand(1, 30, 17, 25)]
    aug = BatchedSSLAugment(ROI, seed=0, n_views=2, min_overlap=0.3, max_overlap=0.8)
    out = aug(vols)
    assert out["view1"].shape == (2, 1, 16, 16, 16)
    starts = aug.last_params["starts"]
    for i, v in enumerate(vols):
        ext = [max(s, r) for s, r in zip(v.shape[1:], ROI, strict=True)]
        pad = []
        for s, e in zip(reversed(v.shape[1:]), reversed(ext), strict=True):
            pad += [(e - s) // 2, e - s - (e - s) // 2]
        padded = F.pad(v, pad)
        for j, name in enumerate(("view1", "view2")):
            a = starts[i, j].tolist()
            assert all(0 <= a[d] <= ext[d] - ROI[d] for d in range(3))
            assert torch.equal(out[name][i], padded[:, a[0]:a[0] + 16, a[1]:a[1] + 16, a[2]:a[2] + 16])


def test_resized_crop_matches_monai_crop_and_resize() -> None:
    x = torch.stack(_volumes(2))
    starts = torch.tensor([[2, 3, 1], [0, 5, 4]])
    sizes = torch.tensor([[10, 12, 9], [16, 16, 16]])
    out = crop_batch(x, starts, sizes, ROI)
    for i in range(2):
        a, z = starts[i].tolist(), sizes[i].tolist()
        ref = SpatialCrop(roi_start=a, roi_end=[p + q for p, q in zip(a, z, strict=True)])(x[i])
        ref = Resize(ROI, mode="trilinear", align_corners=True)(ref)
        assert torch.allclose(out[i], torch.as_tensor(ref), atol=1e-5)


def test_rotation_labels_match_rotated_crop() -> None:
    x = torch.stack(_volumes(8))
    aug = BatchedSSLAugment.for_method("rotation", ROI, seed=1, scale_prob=0.0, shift_prob=0.0,
                                       noise_prob=0.0, n_rotations=24, rot_axes=(0, 1))
    out = aug(x)
    from medssl.transforms.spatial import rotation_ops

    ops = rotation_ops(24)
    starts = aug.last_params["starts"][:, 0]
    for i in range(8):
        a = starts[i].tolist()
        crop = x[i, :, a[0]:a[0] + 16, a[1]:a[1] + 16, a[2]:a[2] + 16]
        assert torch.equal(out["view1"][i], rotate(crop, ops[int(out["view1_rot"][i])], lead=1))
    assert len(set(out["view1_rot"].tolist())) > 3


# -- same distribution as the per-sample path ----------------------------------------------------------
def _close(a: torch.Tensor, b: torch.Tensor, k: float = 5.0) -> bool:
    """Means of two samples agree within ``k`` standard errors (plus a tiny absolute slack)."""
    a, b = a.double(), b.double()
    se = (a.var() / a.numel() + b.var() / b.numel()).sqrt()
    return bool((a.mean() - b.mean()).abs() <= k * se + 1e-6)


def _draw(method: str, n: int, **overrides) -> tuple[dict, dict]:
    vols = _volumes(4)
    t = ssl_transforms(method, ROI, seed=11, **overrides)
    ps: dict[str, list] = {}
    for i in range(n):
        for k, v in t({"image": vols[i % 4]}).items():
            ps.setdefault(k, []).append(torch.as_tensor(v))
    per_sample = {k: torch.stack(v) for k, v in ps.items()}
    aug = BatchedSSLAugment.for_method(method, ROI, seed=11, **overrides)
    bs: dict[str, list] = {}
    for _ in range(n // 20):
        for k, v in aug(torch.stack(vols * 5)).items():
            bs.setdefault(k, []).append(v)
    return per_sample, {k: torch.cat(v) for k, v in bs.items()}


def _stats(batch: dict, name: str) -> dict[str, torch.Tensor]:
    v = batch[name].flatten(1)
    out = {"mean": v.mean(1), "std": v.std(1), "p90": v.quantile(0.9, dim=1)}
    if f"{name}_mask" in batch:
        out["mask"] = batch[f"{name}_mask"].flatten(1).mean(1)
    return out


@pytest.mark.parametrize("method", ["simclr", "genesis", "swin"])
def test_statistics_agree_with_per_sample_path(method: str) -> None:
    per_sample, batched = _draw(method, 240)
    for name in [k for k in per_sample if k in ("view1", "view2")]:
        s1, s2 = _stats(per_sample, name), _stats(batched, name)
        for stat in s1:
            means = float(s1[stat].mean()), float(s2[stat].mean())
            assert _close(s1[stat], s2[stat]), (method, name, stat, means)
    if "view1_rot" in per_sample:
        h1 = torch.bincount(per_sample["view1_rot"], minlength=4).double() / per_sample["view1_rot"].numel()
        h2 = torch.bincount(batched["view1_rot"], minlength=4).double() / batched["view1_rot"].numel()
        assert (h1 - 0.25).abs().max() < 0.1 and (h2 - 0.25).abs().max() < 0.1


def test_mae_mask_ratio_exact_in_both_paths() -> None:
    # pixel-space patch inpainting (the MAE preset itself leaves masking to the method)
    per_sample, batched = _draw("mae", 40, mask="patch", mask_ratio=0.6, patch_size=(4, 4, 4))
    for b in (per_sample, batched):
        r = b["view1_mask"].flatten(1).mean(1)
        assert torch.allclose(r, torch.full_like(r, round(0.6 * 64) / 64))
        masked = b["view1_mask"].bool().expand_as(b["view1"])
        assert torch.all(b["view1"][masked] == 0)
        assert torch.equal(b["view1"][~masked], b["view1_target"][~masked])


def test_crop_overlap_distribution_agrees() -> None:
    from medssl.transforms.views import RandOverlapCropd

    vol = _volumes(1, (1, 28, 30, 26))[0]
    kw = {"scale": (0.7, 1.0), "min_overlap": 0.3, "max_overlap": 0.8}
    t = RandOverlapCropd("image", ROI, box_key="boxes", **kw).set_random_state(0)
    boxes = torch.stack([t({"image": vol})["boxes"] for _ in range(300)])  # (N, V, 2, 3)
    ov1 = box_overlap(boxes[:, 0, 0], boxes[:, 0, 1], boxes[:, 1, 0], boxes[:, 1, 1])
    aug = BatchedSSLAugment(ROI, seed=0, n_views=2, **kw)
    ov2, size2 = [], []
    for _ in range(10):
        aug(vol[None].expand(30, -1, -1, -1, -1))
        s, z = aug.last_params["starts"], aug.last_params["sizes"]
        ov2.append(box_overlap(s[:, 0], z[:, 0], s[:, 1], z[:, 1]))
        size2.append(z.double().mean((1, 2)))
    ov2_t = torch.cat(ov2)
    assert _close(ov1, ov2_t)  # mean overlap
    assert _close((ov1 - ov1.mean()) ** 2, (ov2_t - ov2_t.mean()) ** 2)  # spread
    assert _close(boxes[:, :, 1].double().mean((1, 2)), torch.cat(size2))
    for ov in (ov1, ov2_t):
        assert ((ov >= 0.3) & (ov <= 0.8)).double().mean() > 0.95


def test_flip_frequencies_agree() -> None:
    vol = _volumes(1, (1, 16, 16, 16))[0]  # volume == roi: the view is the whole volume, maybe flipped
    cands = {}
    for fx in (0, 1):
        for fy in (0, 1):
            for fz in (0, 1):
                dims = [d + 1 for d, f in enumerate((fx, fy, fz)) if f]
                cands[(fx, fy, fz)] = vol.flip(dims) if dims else vol

    def which(v: torch.Tensor) -> tuple[int, int, int]:
        return next(k for k, c in cands.items() if torch.equal(v, c))

    off = {"scale_prob": 0.0, "shift_prob": 0.0, "gamma_prob": 0.0, "contrast_prob": 0.0, "blur_prob": 0.0,
           "noise_prob": 0.0}
    t = ssl_transforms("simclr", ROI, seed=2, scale=(1.0, 1.0), **off)
    f1 = torch.tensor([which(torch.as_tensor(t({"image": vol})["view1"])) for _ in range(200)]).double()
    aug = BatchedSSLAugment.for_method("simclr", ROI, seed=2, scale=(1.0, 1.0), **off)
    out = aug(vol[None].expand(200, -1, -1, -1, -1))
    f2 = torch.tensor([which(v) for v in out["view1"]]).double()
    assert torch.equal(f2.bool(), aug.last_params["view1_flips"])
    for a in range(3):
        assert _close(f1[:, a], f2[:, a]) and abs(float(f1[:, a].mean()) - 0.5) < 0.1
