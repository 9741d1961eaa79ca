"""MAE with the ViT encoder: masking, patch order, loss on masked patches only, training."""

from __future__ import annotations

import pytest
import torch

from medssl.methods import build_method
from medssl.methods.mae import patchify
from medssl.networks.encoders import build_encoder

VIT = dict(img_size=(32, 32, 32), patch_size=8, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2)


def test_patchify_matches_monai_token_order() -> None:
    enc = build_encoder("vit", **VIT)
    x = torch.randn(2, 1, 32, 32, 32)
    pe = enc.net.patch_embedding
    w = pe.patch_embeddings.weight  # (E, C, 8, 8, 8) conv kernel == linear map of a flattened patch
    tokens = pe.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, N, E)
    via_patchify = patchify(x, (8, 8, 8)) @ w.reshape(w.shape[0], -1).T + pe.patch_embeddings.bias
    torch.testing.assert_close(via_patchify, tokens, rtol=1e-4, atol=1e-4)


def test_masking_and_masked_loss() -> None:
    enc = build_encoder("vit", **VIT)
    m = build_method("mae", enc, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    keep, mask = m.random_masking(3, 64, torch.device("cpu"))
    assert keep.shape == (3, 16) and mask.shape == (3, 64)
    assert (mask.sum(1) == 48).all() and (mask.gather(1, keep) == 0).all()
    assert len({tuple(k.sort().values.tolist()) for k in keep}) == 3  # a different mask per sample
    # only masked patches count: changing the target on visible patches leaves the loss unchanged
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(5)
    base = m({"view1": x, "view1_target": x})["loss"]
    torch.manual_seed(5)
    keep, _ = m.random_masking(2, 64, torch.device("cpu"))
    t2 = patchify(x, (8, 8, 8)).clone()
    t2.scatter_(1, keep[..., None].expand(-1, -1, t2.shape[2]), 100.0)  # corrupt visible patches only
    tgt = t2.reshape(2, 4, 4, 4, 1, 8, 8, 8).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(2, 1, 32, 32, 32)
    torch.manual_seed(5)
    assert m({"view1": x, "view1_target": tgt})["loss"].item() == pytest.approx(base.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method("mae", enc, mask_ratio=1.0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_trains(norm_pix: bool, check_trains) -> None:
    enc = build_encoder("vit", **VIT)
    m = build_method("mae", enc, decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)
    # masks are redrawn every step (global RNG); the loss on masked patches still falls
    check_trains(m, size=32, lr=3e-3)
    assert "ViT" in enc.downstream
