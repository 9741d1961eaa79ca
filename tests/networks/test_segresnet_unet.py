"""``segresnet_unet``: the whole SegResNet U-Net as an SSL encoder; encoder *and* decoder transfer, only
``conv_final`` is new (SparK); the encoder-only ``segresnet`` keeps transferring its encoder only."""

from __future__ import annotations

import pytest
import torch

from medssl.errors import ConfigMismatchError
from medssl.networks.downstream import (
    build_downstream,
    encoder_depths,
    freeze_encoder,
    layerwise_lr_groups,
    scratch_recipe,
    transfer_keys,
)
from medssl.networks.encoders import build_encoder, rebuild_encoder
from medssl.networks.transfer import SSLCheckpoint, transfer_weights

ROI = (16, 16, 16)
TINY = dict(init_filters=4, blocks_down=(1, 1, 2), blocks_up=(1, 1), norm=("GROUP", {"num_groups": 2}))
ENC = ("convInit.", "down_layers.")
DEC = ("up_samples.", "up_layers.")


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder("segresnet_unet", in_channels=1, img_size=ROI, **TINY).eval()


def _ckpt(enc) -> SSLCheckpoint:
    return SSLCheckpoint(recipe={"encoder": enc.recipe}, encoder_state=enc.state_dict(), source="mem")


def test_encoder_is_the_whole_segresnet() -> None:
    enc = _unet()
    x = torch.randn(2, 1, *ROI)
    with torch.no_grad():
        y = enc.reconstruct(x)
        feats = enc.forward_features(x)
        assert y.shape == x.shape  # out_channels = in_channels: a reconstruction
        assert [f.shape[1] for f in feats] == enc.feature_channels == [4, 8, 16]
        assert [f.shape[2] for f in feats] == [16, 8, 4] and enc.total_stride == 4
        torch.testing.assert_close(enc.decode(feats), y)  # decode ∘ forward_features == the whole net
        assert enc(x).shape == (2, 16)
    # the same downstream arguments as the encoder-only family: finetuning builds the same SegResNet
    half = build_encoder("segresnet", in_channels=1, img_size=ROI, **TINY)
    assert enc.downstream_kwargs == half.downstream_kwargs and enc.recipe["class"] == half.recipe["class"]
    again = rebuild_encoder(enc.recipe)
    assert type(again) is type(enc) and again.recipe == enc.recipe
    exported = enc.export_state_dict("SegResNet")
    assert exported and all(k.startswith(ENC + DEC) for k in exported)
    assert not any(k.startswith("conv_final.") for k in exported)
    with pytest.raises(ValueError, match="len\\(blocks_up\\) == len\\(blocks_down\\) - 1"):
        build_encoder("segresnet_unet", img_size=ROI, blocks_down=(1, 1, 2), blocks_up=(1,))


def test_encoder_and_decoder_transfer_only_conv_final_new() -> None:
    enc = _unet(seed=0)
    ckpt = _ckpt(enc)
    torch.manual_seed(7)  # another init than the "pretrained" one
    net = build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=3).eval()
    head0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("conv_final.")}
    rep = transfer_weights(net, ckpt, target="SegResNet")
    state = net.state_dict()
    body = [k for k in state if k.startswith(ENC + DEC)]
    assert set(body) | set(head0) == set(state)
    pre = enc.net.state_dict()
    assert all(torch.equal(state[k], pre[k]) for k in body)  # exact, key for key
    assert all(torch.equal(state[k], v) for k, v in head0.items())  # conv_final untouched (3 classes)
    assert rep.share == 1.0 and not (rep.missing or rep.unexpected or rep.mismatched)
    assert rep.matched == transfer_keys(net, "SegResNet", "segresnet_unet") == body
    n_dec = sum(k.startswith(DEC) for k in body)
    assert n_dec > 0 and len(rep.matched_decoder) == n_dec and sorted(rep.new) == sorted(head0)
    assert "encoder+decoder" in rep.summary() and f"{len(body) - n_dec} encoder, {n_dec} decoder" in rep.render()
    assert any("conv_final" in n and "not transferred" in n for n in rep.notes)
    # with the reconstruction head copied too, the downstream net IS the pretrained U-Net
    one = build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=1).eval()
    transfer_weights(one, ckpt, target="SegResNet")
    one.conv_final.load_state_dict(enc.net.conv_final.state_dict())
    x = torch.randn(1, 1, *ROI)
    with torch.no_grad():
        torch.testing.assert_close(one(x), enc.reconstruct(x))


def test_encoder_only_family_keeps_its_decoder_new() -> None:
    torch.manual_seed(0)
    half = build_encoder("segresnet", in_channels=1, img_size=ROI, **TINY)
    net = build_downstream("SegResNet", recipe=half.recipe, out_channels=2)
    rep = transfer_weights(net, _ckpt(half), target="SegResNet")
    assert rep.share == 1.0 and not rep.matched_decoder and "encoder+decoder" not in rep.summary()
    assert {k.split(".")[0] for k in rep.new} == {"up_samples", "up_layers", "conv_final"}
    assert transfer_keys(net, "SegResNet") == transfer_keys(net, "SegResNet", "segresnet") == rep.matched
    # a whole-U-Net checkpoint into a net with another decoder: named, not silently half-loaded
    with pytest.raises(ConfigMismatchError, match="upsample_mode"):
        build_downstream("SegResNet", recipe=_unet().recipe, out_channels=2, upsample_mode="deconv")
    # (from the encoder-only recipe the decoder is free: nothing of it is pretrained)
    build_downstream("SegResNet", recipe=half.recipe, out_channels=2, upsample_mode="deconv")
    assert scratch_recipe("SegResNet", in_channels=1, img_size=ROI, **TINY)["name"] == "segresnet"


def test_decoder_trains_with_the_head_encoder_frozen_and_decayed() -> None:
    enc = _unet()
    net = build_downstream("SegResNet", recipe=enc.recipe, out_channels=2)
    transfer_weights(net, _ckpt(enc), target="SegResNet")
    params = dict(net.named_parameters())
    depths = encoder_depths(net, "SegResNet")
    assert set(depths) == {k for k in params if k.startswith(ENC)} and sorted(set(depths.values())) == [0, 1, 2, 3]
    groups = layerwise_lr_groups(net, "SegResNet", base_lr=1e-2, decay=0.5)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == pytest.approx(1e-2)
    assert set(groups[0]["param_names"]) == {k for k in params if k.startswith(DEC + ("conv_final.",))}
    frozen = freeze_encoder(net, "SegResNet")
    assert set(frozen) == set(depths)
    net(torch.randn(2, 1, *ROI)).square().mean().backward()
    assert all(params[k].grad is None for k in frozen)
    assert all(p.grad is not None for k, p in params.items() if k.startswith(DEC))  # decoder trains
