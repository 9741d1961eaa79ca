"""Registry and batch validation shared by all methods."""

from __future__ import annotations

import pytest
import torch

from medssl.methods import METHODS, SSLMethod, build_method
from medssl.networks.encoders import build_encoder


@pytest.fixture(scope="module")
def resnet():
    return build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.125)


def test_registry(resnet) -> None:
    assert set(METHODS) == {"simclr", "triplet", "rotation", "mae", "genesis", "swin", "vicreg", "byol", "spark"}
    m = build_method("simclr", resnet, hidden_dim=16, out_dim=8)
    assert isinstance(m, SSLMethod) and m.name == "simclr" and m.encoder is resnet
    with pytest.raises(ValueError, match="known: simclr"):
        build_method("dino", resnet)
    with pytest.raises(ValueError, match="needs a medssl Encoder"):
        build_method("simclr", torch.nn.Linear(2, 2))


def test_encoder_family_checked(resnet) -> None:
    for name, needed in (("mae", "vit"), ("genesis", "unet"), ("swin", "swinvit")):
        with pytest.raises(ValueError, match=needed):
            build_method(name, resnet)


def test_missing_and_bad_keys(resnet, make_batch) -> None:
    m = build_method("rotation", resnet)
    batch = make_batch(2, 16)
    del batch["view1_rot"]
    with pytest.raises(KeyError, match=r"'rotation' needs batch key\(s\) \['view1_rot'\]"):
        m(batch)
    batch = make_batch(2, 16)
    batch["view1"] = batch["view1"][:, 0]
    with pytest.raises(ValueError, match=r"batch\['view1'\] must be \(B, C, D, H, W\)"):
        m(batch)
    s = build_method("simclr", resnet, hidden_dim=16, out_dim=8)
    batch = make_batch(2, 16)
    batch["view2"] = batch["view2"][..., :8]
    with pytest.raises(ValueError, match="differ in shape"):
        s(batch)


@pytest.mark.parametrize("name", ["simclr", "byol", "mae", "swin"])
def test_bf16_autocast_forward(name: str, make_batch) -> None:
    if name == "mae":
        enc = build_encoder(
            "vit", img_size=(32,) * 3, patch_size=8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2
        )
        kw, size = dict(decoder_dim=12, decoder_depth=1, decoder_heads=2), 32
    elif name == "swin":
        enc = build_encoder(
            "swinvit", img_size=(32,) * 3, feature_size=12, depths=(1,) * 4, num_heads=(1,) * 4, window_size=4
        )
        kw, size = dict(contrast_dim=8), 32
    else:
        enc = build_encoder("resnet3d", img_size=(16,) * 3, depth=10, widen_factor=0.125)
        kw, size = dict(hidden_dim=16, out_dim=8), 16
    m = build_method(name, enc, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(make_batch(2, size))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_method_checkpoint_to_downstream(make_batch) -> None:
    """The path documented in methods/base.py: method state dict → encoder → downstream MONAI net."""
    from monai.networks.nets import SegResNet

    from medssl.networks.encoders import rebuild_encoder

    enc = build_encoder(
        "segresnet", img_size=(16,) * 3, init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)
    )
    m = build_method("byol", enc, hidden_dim=16, out_dim=8)
    m(make_batch(2, 16))["loss"].backward()
    sd = m.state_dict()
    twin = rebuild_encoder(enc.recipe)
    twin.load_state_dict(
        {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    )  # strict
    net = SegResNet(**enc.recipe["downstream_kwargs"]["SegResNet"], out_channels=3)
    assert net.load_state_dict(twin.export_state_dict("SegResNet"), strict=False).unexpected_keys == []
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval().encode(x)[0], enc.eval().forward_features(x)[-1])
