"""Downstream builders: encoder part identical to the SSL encoder, scratch == SSL architecture, finetune options."""

from __future__ import annotations

import pytest
import torch

from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.downstream import (
    DOWNSTREAM_KINDS,
    ENCODER_FAMILY,
    EncoderWarmup,
    build_downstream,
    downstream_features,
    encoder_depths,
    encoder_keys,
    encoder_prefix,
    freeze_encoder,
    layerwise_lr_groups,
    transfer_keys,
)
from medssl.networks.encoders import build_encoder

# tiny encoder-family arguments per downstream kind (as pretraining would pass them)
TINY = {
    # (32, 32, 64): the deepest Swin map keeps 2 voxels, which the decoder's instance norm needs
    "SwinUNETR": dict(
        img_size=(32, 32, 64), feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4
    ),
    "UNETR": dict(img_size=(32, 32, 32), hidden_size=24, mlp_dim=48, num_heads=2),
    "SegResNet": dict(img_size=(16, 16, 16), init_filters=8, blocks_down=(1, 1, 2), blocks_up=(1, 1)),
    "ResNet": dict(img_size=(16, 16, 16), depth=10, widen_factor=0.125),
    "BasicUNet": dict(img_size=(32, 32, 32), features=(4, 4, 8, 8, 16, 4)),
    "UNet": dict(img_size=(16, 16, 16), channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
}


def _encoder(kind: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_encoder(ENCODER_FAMILY[kind], in_channels=1, **(TINY[kind] | over)).eval()


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", DOWNSTREAM_KINDS)
def test_encoder_part_matches_encoder_and_scratch_matches_ssl(kind: str) -> None:
    enc = _encoder(kind)
    ssl_net = build_downstream(kind, recipe=enc.recipe, out_channels=3)
    # the key table agrees with the encoder's own export, and covers exactly its weights with the same shapes
    assert enc.downstream[kind] == encoder_prefix(kind)
    exported = {k: tuple(v.shape) for k, v in enc.export_state_dict(kind).items()}
    # (the pretrained part: the encoder, plus the decoder for BasicUNet; transfer_keys == encoder_keys otherwise)
    assert exported == {k: s for k, s in _shapes(ssl_net).items() if k in set(transfer_keys(ssl_net, kind))}
    assert set(exported) == set(transfer_keys(ssl_net, kind)) >= set(encoder_keys(ssl_net, kind))
    assert len(exported) < len(ssl_net.state_dict())  # a decoder / head exists beside the encoder
    # scratch from the same plain arguments: the same architecture, key for key and shape for shape
    scratch = build_downstream(kind, recipe=None, out_channels=3, in_channels=1, **TINY[kind])
    assert _shapes(scratch) == _shapes(ssl_net)
    # a checkpoint recipe (encoder under "encoder") is accepted as well
    assert _shapes(build_downstream(kind, recipe={"encoder": enc.recipe}, out_channels=3)) == _shapes(ssl_net)
    x = torch.randn(1, 1, *TINY[kind]["img_size"])
    with torch.no_grad():
        y = ssl_net.eval()(x)
        feats = downstream_features(ssl_net, kind, x)
    assert y.shape == ((1, 3) if kind == "ResNet" else (1, 3, *x.shape[2:]))
    assert [f.shape[1] for f in feats] == enc.feature_channels


def test_recipe_conflicts_and_wrong_family() -> None:
    enc = _encoder("SwinUNETR")
    with pytest.raises(ConfigMismatchError, match="feature_size: 12 != 24"):
        build_downstream("SwinUNETR", recipe=enc.recipe, out_channels=2, feature_size=24)
    # same value and decoder-only arguments are fine
    net = build_downstream("SwinUNETR", recipe=enc.recipe, out_channels=2, feature_size=12, norm_name="batch")
    assert net.out.conv.conv.out_channels == 2
    with pytest.raises(MedsslError, match=r"cannot initialise a UNETR; it transfers to: \['SwinUNETR'\]"):
        build_downstream("UNETR", recipe=enc.recipe, out_channels=2)
    with pytest.raises(ValueError, match="unknown downstream network 'DenseNet'"):
        build_downstream("DenseNet", recipe=None, out_channels=2)
    with pytest.raises(ValueError, match="feature_size must be divisible by 12"):
        build_downstream("SwinUNETR", recipe=None, out_channels=2, feature_size=13)


@pytest.mark.parametrize("kind", ["SegResNet", "ResNet"])
def test_freeze_encoder_leaves_only_head_trainable(kind: str) -> None:
    net = build_downstream(kind, recipe=None, out_channels=2, in_channels=1, **TINY[kind])
    frozen = freeze_encoder(net, kind)
    assert set(frozen) == {k for k, _ in net.named_parameters() if k in set(encoder_keys(net, kind))}
    trainable = [k for k, p in net.named_parameters() if p.requires_grad]
    assert trainable and not set(trainable) & set(frozen)
    if kind == "ResNet":
        assert trainable == ["fc.weight", "fc.bias"]  # linear probe: the classifier only
    net(torch.randn(2, 1, *TINY[kind]["img_size"])).square().mean().backward()
    assert all(p.grad is None for k, p in net.named_parameters() if k in frozen)
    assert all(p.grad is not None for k, p in net.named_parameters() if k in trainable)
    freeze_encoder(net, kind, freeze=False)
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("kind", DOWNSTREAM_KINDS)
def test_layerwise_lr_groups_decay_toward_stem_and_cover_once(kind: str) -> None:
    net = build_downstream(kind, recipe=None, out_channels=2, in_channels=1, **TINY[kind])
    groups = layerwise_lr_groups(net, kind, base_lr=1e-3, decay=0.5)
    lrs = [g["lr"] for g in groups]
    assert groups[0]["name"] == "head" and lrs[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # strictly decreasing head → stem
    assert groups[-1]["depth"] == 0 and lrs[-1] == pytest.approx(1e-3 * 0.5 ** groups[0]["depth"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    n_levels = {"SwinUNETR": 5, "UNETR": 14, "SegResNet": 4, "ResNet": 5, "BasicUNet": 5, "UNet": 3}[kind]
    assert sorted(set(encoder_depths(net, kind).values())) == list(range(n_levels))
    torch.optim.AdamW(groups)  # a valid optimizer spec
    with pytest.raises(ValueError, match="decay"):
        layerwise_lr_groups(net, kind, base_lr=1e-3, decay=1.5)


def test_encoder_warmup_holds_encoder_then_ramps() -> None:
    warm = EncoderWarmup(2, 2)
    assert [warm(t) for t in range(6)] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert warm.frozen(1) and not warm.frozen(2)
    torch.manual_seed(0)
    net = build_downstream("SegResNet", recipe=None, out_channels=2, in_channels=1, **TINY["SegResNet"])
    opt = torch.optim.SGD(layerwise_lr_groups(net, "SegResNet", base_lr=0.1, decay=1.0), lr=0.1)
    enc0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("convInit.")}
    head0 = net.conv_final[2].conv.weight.detach().clone()
    x = torch.randn(1, 1, 8, 8, 8)
    seen = []
    for t in range(4):  # no schedule rewrites the lrs: apply() must not compound
        seen.append([(g["encoder"], g["lr"]) for g in (opt.param_groups[0], opt.param_groups[-1])])
        warm.apply(opt, t)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        if t == 1:  # two frozen steps: encoder untouched, head trained
            assert all(torch.equal(net.state_dict()[k], v) for k, v in enc0.items())
            assert not torch.equal(net.conv_final[2].conv.weight, head0)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.1) and opt.param_groups[0]["lr"] == pytest.approx(
        0.1
    )
    assert not torch.equal(net.state_dict()["convInit.conv.weight"], enc0["convInit.conv.weight"])
    assert seen[1][1] == (True, 0.0)  # encoder group lr was 0 at step 1 before apply
    with pytest.raises(ValueError):
        EncoderWarmup(-1)
