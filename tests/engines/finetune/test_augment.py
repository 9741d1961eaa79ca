"""nnU-Net-style spatial / gamma / noise finetuning augmentation (``augment`` optional keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medssl.engines.finetune.augment import AUGMENT_DEFAULTS, augment_transforms, resolve_augment
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.identity import config_identity


def _pair(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 24³ label with two blobs (classes 1, 2) and an image equal to the label (float)."""
    lab = torch.zeros(1, 24, 24, 24)
    lab[:, 6:12, 6:18, 8:16] = 1
    lab[:, 13:19, 6:18, 8:16] = 2
    return {"image": lab.clone(), "label": lab}


def test_optional_keys_off_are_not_recorded():
    """Configurations that predate the optional keys resolve to the same dict (same config hash)."""
    assert resolve_augment({}) == AUGMENT_DEFAULTS
    assert resolve_augment({"flip_axes": [0], "gamma": [1.0, 1.0], "rotate": 0}) == {**AUGMENT_DEFAULTS,
                                                                                   "flip_axes": [0]}
    on = resolve_augment({"rotate": 15, "scale": 0.15, "gamma": [0.7, 1.5], "noise_std": 0.05})
    assert on["rotate"] == 15.0 and on["scale"] == 0.15 and on["spatial_prob"] == 0.2
    assert on["gamma"] == [0.7, 1.5] and on["gamma_prob"] == 0.3
    assert on["noise_std"] == 0.05 and on["noise_prob"] == 0.1
    assert resolve_augment({"gamma": 1.5})["gamma"] == pytest.approx([1 / 1.5, 1.5])


def test_config_hash_unchanged_by_off_keys_and_changed_by_on_keys():
    base = FinetuneConfig(datalist="d.json", splits="s.json", augment={"flip_axes": [0]})
    same = FinetuneConfig(datalist="d.json", splits="s.json", augment={"flip_axes": [0], "rotate": 0.0})
    other = FinetuneConfig(datalist="d.json", splits="s.json", augment={"flip_axes": [0], "rotate": 15})
    assert config_identity(base) == config_identity(same)
    assert config_identity(base) != config_identity(other)


@pytest.mark.parametrize(
    "bad, word",
    [({"rotate": -1}, "rotate"), ({"rotate": 400}, "degrees"), ({"scale": 1.2}, "scale"),
     ({"spatial_prob": 2}, "spatial_prob"), ({"gamma": [1.5, 0.7]}, "gamma"), ({"noise_std": -0.1}, "noise_std"),
     ({"rotation": 10}, "unknown")],
)
def test_bad_values_name_the_key(bad, word):
    with pytest.raises(ValueError, match=word):
        resolve_augment(bad)


def test_affine_keeps_image_and_label_aligned_and_classes_intact():
    tf = Compose(augment_transforms(["image", "label"], {"flip_prob": 0.0, "rotate": 30, "scale": 0.2,
                                                         "spatial_prob": 1.0}))
    changed = 0
    for seed in range(5):
        tf.set_random_state(seed=seed)
        d = _pair()
        out = tf(d)
        img, lab = np.asarray(out["image"]), np.asarray(out["label"])
        assert img.shape == lab.shape == (1, 24, 24, 24)
        assert set(np.unique(lab)) <= {0.0, 1.0, 2.0}  # nearest: no new classes
        assert {1.0, 2.0} <= set(np.unique(lab))
        for c in (1.0, 2.0):  # the bilinear image agrees with the nearest label inside each class ...
            assert np.mean(np.abs(img[lab == c] - c) < 0.5) > 0.75
            shifted = np.roll(lab, 4, axis=1)  # ... which a 4-voxel misalignment would break
            assert np.mean(np.abs(img[shifted == c] - c) < 0.5) < 0.6
        changed += int(not np.array_equal(lab, np.asarray(d["label"])))
    assert changed == 5


def test_affine_is_reproducible_with_a_seed():
    tf = Compose(augment_transforms(["image", "label"], {"rotate": 20, "scale": 0.1, "spatial_prob": 1.0}))
    tf.set_random_state(seed=3)
    a = tf(_pair())["label"]
    tf.set_random_state(seed=3)
    b = tf(_pair())["label"]
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_gamma_and_noise_touch_the_image_only():
    tf = Compose(augment_transforms(["image", "label"], {"flip_prob": 0.0, "gamma": [0.5, 0.6], "gamma_prob": 1.0,
                                                         "noise_std": 0.1, "noise_prob": 1.0}))
    tf.set_random_state(seed=0)
    d = _pair()
    d["image"] = d["image"] / 2 + 0.1  # values 0.1 / 0.6 / 1.1: gamma changes the middle one
    out = tf(d)
    assert torch.equal(torch.as_tensor(out["label"]), _pair()["label"])
    assert not torch.allclose(torch.as_tensor(out["image"]), d["image"])
