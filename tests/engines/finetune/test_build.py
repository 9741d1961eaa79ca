"""`build_model`: one pipeline's network_kwargs serve both scratch and SSL inits."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.engines.finetune.build import build_model
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.runtime.checkpoint import save_encoder
from medssl.errors import ConfigMismatchError
from medssl.networks.encoders import build_encoder

KW = {"depth": 10, "widen_factor": 0.25}


def _ssl(tmp_path: Path, **kw) -> Path:
    enc = build_encoder("resnet3d", in_channels=1, img_size=(16, 16, 16), **kw)
    recipe = dict(encoder=enc.recipe, method="simclr", method_kwargs={}, in_channels=1, roi_size=[16, 16, 16],
                  target_spacing=None, normalisation="robust", ct_window=[-1000.0, 1000.0])
    pt, _ = save_encoder(tmp_path / "ssl", enc, recipe)
    return pt


def _cfg(init: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(task="classification", network="ResNet", network_kwargs=kw, num_classes=2,
                          roi_size=[16, 16, 16], init=init, experiment=None)


def test_encoder_kwargs_equal_to_the_recipe_are_accepted_for_ssl(tmp_path: Path) -> None:
    pt = _ssl(tmp_path, **KW)
    scratch, *_ = build_model(_cfg("scratch", **KW))
    ssl, _, report, _ = build_model(_cfg(f"ssl:{pt}", **KW))
    assert report is not None and report.share == 1.0
    a, b = scratch.state_dict(), ssl.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_encoder_kwargs_contradicting_the_recipe_are_refused(tmp_path: Path) -> None:
    pt = _ssl(tmp_path, **KW)
    with pytest.raises(ConfigMismatchError, match="layers|widen_factor"):
        build_model(_cfg(f"ssl:{pt}", depth=18, widen_factor=0.25))
