"""SwinUNETR multi-task pretraining (inpainting + rotation + contrastive)."""

from __future__ import annotations

import pytest
import torch

from medssl.methods import build_method
from medssl.networks.encoders import build_encoder

SWIN = dict(
    img_size=(32, 32, 32), feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4
)


def test_trains_with_all_terms(check_trains, make_batch) -> None:
    enc = build_encoder("swinvit", **SWIN)
    m = build_method("swin", enc, contrast_dim=16, temperature=0.5)
    check_trains(m, size=32, b=2, overfit_steps=6, lr=1e-3)
    out = m(make_batch(2, 32))
    parts = out["rotation_ce"] + out["contrastive"] + out["reconstruction_l1"]
    torch.testing.assert_close(out["loss"].detach(), parts)
    w = build_method("swin", enc, contrast_dim=16, rot_weight=0.0, contrast_weight=2.0, recon_weight=0.5)
    torch.manual_seed(0)
    o = w(make_batch(2, 32))
    torch.testing.assert_close(o["loss"].detach(), 2.0 * o["contrastive"] + 0.5 * o["reconstruction_l1"])
    assert set(enc.export_state_dict("SwinUNETR")) and m.encoder is enc


def test_requires_rotation_and_targets(make_batch) -> None:
    m = build_method("swin", build_encoder("swinvit", **SWIN), contrast_dim=8)
    batch = make_batch(2, 32)
    del batch["view2_rot"], batch["view1_target"]
    with pytest.raises(KeyError, match=r"\['view1_target', 'view2_rot'\]"):
        m(batch)
