"""Encoders: shapes, recipe round trip, and strict weight transfer into the real MONAI downstream nets."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import UNETR, BasicUNet, ResNet, SegResNet, SwinUNETR

from medssl.networks.encoders import ENCODERS, build_encoder, rebuild_encoder

SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
VIT = dict(hidden_size=24, mlp_dim=48, num_heads=2)  # UNETR's patch 16 and 12 layers
SEGRES = dict(init_filters=8, blocks_down=(1, 1, 2), blocks_up=(1, 1))
RESNET = dict(depth=10, widen_factor=0.125)
UNET = dict(features=(8, 8, 16, 16, 32, 8))
TINY = {
    "swinvit": ((32, 32, 32), SWIN),
    "vit": ((32, 32, 32), VIT),
    "segresnet": ((16, 16, 16), SEGRES),
    "resnet3d": ((16, 16, 16), RESNET),
    "unet": ((32, 32, 32), UNET),
}


def _downstream(name: str) -> tuple[str, torch.nn.Module]:
    """The downstream MONAI net written out by hand with the same arguments as the encoder."""
    torch.manual_seed(1)
    if name == "swinvit":
        return "SwinUNETR", SwinUNETR(in_channels=1, out_channels=3, **SWIN)
    if name == "vit":
        return "UNETR", UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), **VIT)
    if name == "segresnet":
        return "SegResNet", SegResNet(spatial_dims=3, in_channels=1, out_channels=3, **SEGRES)
    if name == "resnet3d":
        return "ResNet", ResNet(
            "basic", [1, 1, 1, 1], [64, 128, 256, 512], n_input_channels=1, widen_factor=0.125, num_classes=3
        )
    return "BasicUNet", BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=UNET["features"])


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_recipe_and_transfer(name: str) -> None:
    img, kw = TINY[name]
    torch.manual_seed(0)
    enc = build_encoder(name, in_channels=1, img_size=img, **kw).eval()
    x = torch.randn(2, 1, *img)
    with torch.no_grad():
        feats = enc.forward_features(x)
        g = enc(x)
    assert g.shape == (2, enc.feature_dim)
    assert [f.shape[1] for f in feats] == enc.feature_channels
    assert all(f.shape[0] == 2 and f.ndim == 5 for f in feats)
    assert feats[0].shape[2] >= feats[-1].shape[2]  # shallow → deep

    # recipe survives JSON and rebuilds the same architecture
    recipe = json.loads(json.dumps(enc.recipe))
    assert recipe == enc.recipe  # exactly JSON-representable (tuples stored as lists)
    assert recipe["name"] == name and recipe["class"].startswith("monai.networks.nets")
    twin = rebuild_encoder(recipe).eval()
    assert {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in enc.state_dict().items()
    }
    twin.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), g)

    # strict transfer into the hand-built downstream network: every encoder key lands, shapes match
    target, net = _downstream(name)
    assert target in enc.downstream
    exported = enc.export_state_dict(target)
    prefix = enc.downstream[target]
    assert exported and all(k.startswith(prefix) for k in exported)
    res = net.load_state_dict(exported, strict=False)  # raises on any shape mismatch
    assert res.unexpected_keys == []
    net_keys = set(net.state_dict())
    assert set(exported) <= net_keys
    missing_encoder = [k for k in res.missing_keys if k in exported]
    assert missing_encoder == []
    for k, v in exported.items():
        assert torch.equal(net.state_dict()[k], v)

    # the downstream net built from the recipe's downstream_kwargs accepts the same weights
    cls = type(net)
    extra = {"num_classes": 3} if target == "ResNet" else {"out_channels": 3}
    net2 = cls(**recipe["downstream_kwargs"][target], **extra)
    assert net2.load_state_dict(exported, strict=False).unexpected_keys == []


def test_transferred_weights_compute_the_same_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    swin = build_encoder("swinvit", img_size=(32, 32, 32), **SWIN).eval()
    _, net = _downstream("swinvit")
    net.load_state_dict(swin.export_state_dict("SwinUNETR"), strict=False)
    net.eval()
    with torch.no_grad():
        for a, b in zip(swin.forward_features(x), net.swinViT(x, net.normalize), strict=True):
            torch.testing.assert_close(a, b)
    vit = build_encoder("vit", img_size=(32, 32, 32), **VIT).eval()
    _, unetr = _downstream("vit")
    unetr.load_state_dict(vit.export_state_dict("UNETR"), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(vit.tokens(x)[0], unetr.eval().vit(x)[0])
    res = build_encoder("resnet3d", img_size=(16, 16, 16), **RESNET).eval()
    _, rnet = _downstream("resnet3d")
    rnet.load_state_dict(res.export_state_dict("ResNet"), strict=False)
    rnet.fc = None  # a ResNet without fc returns the pooled feature
    with torch.no_grad():
        xs = x[..., :16, :16, :16]
        torch.testing.assert_close(res(xs), rnet.eval()(xs))


def test_vit_with_other_patch_is_not_unetr_compatible() -> None:
    enc = build_encoder(
        "vit", img_size=(16, 16, 16), patch_size=8, hidden_size=12, mlp_dim=24, num_layers=2, num_heads=2
    )
    assert "UNETR" not in enc.downstream and "ViT" in enc.downstream
    assert enc(torch.randn(1, 1, 16, 16, 16)).shape == (1, 12)
    with pytest.raises(ValueError, match="known targets"):
        enc.export_state_dict("UNETR")


def test_errors() -> None:
    with pytest.raises(ValueError, match="known"):
        build_encoder("densenet")
    with pytest.raises(ValueError, match="divisible by 12"):
        build_encoder("swinvit", feature_size=10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_encoder("vit", img_size=(20, 20, 20))
    with pytest.raises(ValueError, match="depth"):
        build_encoder("resnet3d", depth=50)
    recipe = build_encoder("resnet3d", img_size=(16, 16, 16), **RESNET).recipe
    with pytest.raises(ValueError, match="recipe class"):
        rebuild_encoder(recipe | {"class": "monai.networks.nets.DenseNet"})
    assert set(ENCODERS) == {"swinvit", "vit", "segresnet", "segresnet_unet", "resnet3d", "unet", "monai_unet"}
