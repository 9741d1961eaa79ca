"""Test-time flips for finetuning validation / test (``FinetuneConfig.tta``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.inferers import SimpleInferer

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.identity import config_identity
from medssl.engines.finetune.tta import FlipTTAInferer, flip_dims
from tests.deploy._finetuned import finetune_seg


def test_flip_dims():
    assert flip_dims([0]) == [(2,)]
    assert flip_dims([2, 0]) == [(2,), (4,), (2, 4)]
    assert flip_dims([]) == []
    with pytest.raises(ValueError, match="0..2"):
        flip_dims([3])


def test_average_of_softmax_over_the_flips():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 6, 8, 10)
    got = FlipTTAInferer(SimpleInferer(), [0, 2])(x, net)
    with torch.no_grad():
        want = sum(torch.flip(torch.softmax(net(torch.flip(x, d)), 1), d) for d in [(), (2,), (4,), (2, 4)]) / 4
        assert torch.allclose(got.exp(), want, atol=1e-6)
        assert torch.allclose(got.exp().sum(1), torch.ones(1, 6, 8, 10), atol=1e-5)
        # no allowed axes: the plain log-softmax (same argmax as the logits)
        plain = FlipTTAInferer(SimpleInferer(), [])(x, net)
        assert torch.allclose(plain, torch.log_softmax(net(x), 1), atol=1e-5)


def test_tta_is_hash_neutral_when_off():
    a = FinetuneConfig(datalist="d.json", splits="s.json")
    assert config_identity(a) == config_identity(FinetuneConfig(datalist="d.json", splits="s.json", tta=False))
    assert config_identity(a) != config_identity(FinetuneConfig(datalist="d.json", splits="s.json", tta=True))


def test_finetuner_scores_with_flips_along_the_training_axes_only(hippocampus_dir: Path, tmp_path: Path):
    ft, _ = finetune_seg(hippocampus_dir, tmp_path, tta=True, augment={"flip_axes": [0]})
    assert isinstance(ft.inferer, FlipTTAInferer) and ft.inferer.dims == [(2,)]
    assert 0.0 <= ft.evaluate(ft.val_ds)["dice_mean"] <= 1.0
    ft2, _ = finetune_seg(hippocampus_dir, tmp_path / "noflip", tta=True, augment={"flip_prob": 0.0})
    assert ft2.inferer.dims == []
