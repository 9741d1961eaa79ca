"""``monai_unet``: the whole MONAI residual UNet as an SSL encoder (SparK); encoder *and* decoder transfer into a
finetuning ``network: UNet``, only the top up block ``model.2`` (the out_channels-shaped part) is new; a
kwargs mismatch is refused naming the key; scratch and SSL nets differ only in the transferred weights."""

from __future__ import annotations

import pytest
import torch

from medssl.engines.finetune.build import build_model, single_param_group
from medssl.engines.finetune.config import FinetuneConfig
from medssl.errors import ConfigMismatchError
from medssl.networks.downstream import (
    build_downstream,
    downstream_features,
    encoder_depths,
    encoder_keys,
    layerwise_lr_groups,
    transfer_keys,
)
from medssl.networks.encoders import build_encoder, rebuild_encoder
from medssl.networks.encoders_unet import unet_key_prefixes, unet_stage_strides
from medssl.networks.finetune_opts import freeze_pretrained
from medssl.networks.transfer import SSLCheckpoint, TransferError, load_ssl_checkpoint, transfer_weights

ROI = (16, 16, 16)
TINY = dict(channels=(4, 8, 16, 16), strides=(2, 2, 1), num_res_units=2)
HEAD = "model.2."


def _enc(seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_encoder("monai_unet", in_channels=1, img_size=ROI, **(TINY | over)).eval()


def _ckpt(enc) -> SSLCheckpoint:
    return SSLCheckpoint(recipe={"encoder": enc.recipe}, encoder_state=enc.state_dict(), source="mem")


def test_encoder_is_the_whole_monai_unet() -> None:
    enc = _enc()
    x = torch.randn(2, 1, *ROI)
    with torch.no_grad():
        y = enc.reconstruct(x)
        feats = enc.forward_features(x)
        assert y.shape == x.shape  # out_channels = in_channels: a reconstruction
        assert [f.shape[1] for f in feats] == enc.feature_channels == [4, 8, 16, 16]
        assert [tuple(f.shape[2:]) for f in feats] == [(8, 8, 8), (4, 4, 4), (4, 4, 4), (4, 4, 4)]
        assert enc.stage_strides == [(2, 2, 2), (4, 4, 4), (4, 4, 4), (4, 4, 4)] and enc.total_stride == (4, 4, 4)
        torch.testing.assert_close(enc.decode(feats), y)  # decode ∘ forward_features == MONAI's forward
        assert enc(x).shape == (2, 16)
    assert unet_stage_strides([[2, 2, 1], 2]) == [(2, 2, 1), (4, 4, 2), (4, 4, 2)]
    again = rebuild_encoder(enc.recipe)
    assert type(again) is type(enc) and again.recipe == enc.recipe
    assert enc.recipe["class"] == "monai.networks.nets.UNet" and "out_channels" not in enc.downstream_kwargs["UNet"]
    exported = enc.export_state_dict("UNet")
    assert exported and not any(k.startswith(HEAD) for k in exported)
    assert {k for k in enc.net.state_dict() if k.startswith(HEAD)}  # the reconstruction head exists, not exported
    with pytest.raises(ValueError, match=r"len\(strides\) == len\(channels\) - 1"):
        build_encoder("monai_unet", img_size=ROI, channels=(4, 8), strides=(2, 2))


def test_encoder_and_decoder_transfer_only_the_top_up_block_is_new() -> None:
    enc = _enc(seed=0)
    torch.manual_seed(7)  # another init than the "pretrained" one
    net = build_downstream("UNet", recipe=enc.recipe, out_channels=3).eval()
    head0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(HEAD)}
    rep = transfer_weights(net, _ckpt(enc), target="UNet")
    state, pre = net.state_dict(), enc.net.state_dict()
    body = [k for k in state if not k.startswith(HEAD)]
    assert rep.matched == body == transfer_keys(net, "UNet", "monai_unet")  # every non-head key, in order
    assert all(torch.equal(state[k], pre[k]) for k in body)
    assert all(torch.equal(state[k], v) for k, v in head0.items())  # the head keeps its fresh init
    assert sorted(rep.new) == sorted(head0) and rep.share == 1.0
    assert not (rep.missing or rep.unexpected or rep.mismatched)
    enc_part, dec_part = encoder_keys(net, "UNet"), rep.matched_decoder
    assert enc_part and dec_part and set(enc_part) | set(dec_part) == set(body)
    assert all(".2." in k for k in dec_part)  # up blocks of levels 1..n-1
    text = rep.render()
    assert f"{len(enc_part)} encoder, {len(dec_part)} decoder" in text and "model.2.*" in text
    assert "encoder+decoder" in rep.summary()
    # new == the keys whose shapes depend on out_channels, plus the top block's PReLU (shape (1,))
    other = build_downstream("UNet", recipe=enc.recipe, out_channels=5).state_dict()
    shaped = {k for k in state if state[k].shape != other[k].shape}
    assert shaped and shaped <= set(rep.new) and all(k.startswith(HEAD) for k in rep.new)
    # with the reconstruction head copied too, the downstream net IS the pretrained U-Net
    one = build_downstream("UNet", recipe=enc.recipe, out_channels=1).eval()
    transfer_weights(one, _ckpt(enc), target="UNet")
    one.load_state_dict({k: v for k, v in pre.items() if k.startswith(HEAD)}, strict=False)
    x = torch.randn(1, 1, *ROI)
    with torch.no_grad():
        torch.testing.assert_close(one(x), enc.reconstruct(x))
        assert [f.shape for f in downstream_features(one, "UNet", x)] == [f.shape for f in enc.forward_features(x)]


@pytest.mark.parametrize(("key", "value"), [("channels", (4, 8, 32, 16)), ("strides", (2, 2, 2)),
                                            ("num_res_units", 1)])
def test_kwargs_mismatch_is_refused_naming_the_key(key: str, value, tmp_path) -> None:
    enc = _enc()
    with pytest.raises(ConfigMismatchError, match=key):
        build_downstream("UNet", recipe=enc.recipe, out_channels=3, **{key: value})
    build_downstream("UNet", recipe=enc.recipe, out_channels=3, **{key: TINY[key]})  # the same value: fine
    # the finetune config (network_kwargs explicit, as a pipeline gives them) against the checkpoint
    path = tmp_path / "encoder.pt"
    torch.save({"recipe": {"encoder": enc.recipe, "in_channels": 1}, "state_dict": enc.state_dict()}, path)
    cfg = FinetuneConfig(network="UNet", network_kwargs=TINY | {key: value}, roi_size=list(ROI), init=f"ssl:{path}")
    with pytest.raises(ConfigMismatchError, match=key):
        build_model(cfg)
    # a checkpoint of another UNet into a net built otherwise (bypassing the config check): never silent
    net = build_downstream("UNet", recipe=None, out_channels=3, in_channels=1, img_size=ROI, **(TINY | {key: value}))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    if key == "num_res_units":  # a net with fewer units is filled; the checkpoint's extra units are listed
        rep = transfer_weights(net, load_ssl_checkpoint(path), target="UNet")
        assert rep.unexpected and all(".conv.unit1." in k for k in rep.unexpected)
        return
    with pytest.raises(TransferError, match="SSL checkpoint does not fit the UNet network") as err:
        transfer_weights(net, load_ssl_checkpoint(path), target="UNet")
    assert err.value.report.mismatched  # (key, checkpoint shape, network shape) rows in the message
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # nothing loaded


def test_scratch_and_ssl_differ_only_in_the_transferred_weights(tmp_path) -> None:
    enc = _enc(seed=3)
    path = tmp_path / "encoder.pt"
    torch.save({"recipe": {"encoder": enc.recipe, "in_channels": 1}, "state_dict": enc.state_dict()}, path)
    base = dict(network="UNet", network_kwargs=dict(TINY), roi_size=list(ROI), out_channels=3)
    torch.manual_seed(11)
    scratch, s_recipe, s_rep, _ = build_model(FinetuneConfig(**base))
    torch.manual_seed(11)
    ssl, recipe, rep, pre = build_model(FinetuneConfig(**base, init=f"ssl:{path}"))
    assert s_rep is None and s_recipe["build"]["recipe"] is None and recipe["build"]["recipe"]["name"] == "monai_unet"
    assert pre["size_divisor"] == 4 and not rep.missing
    a, b, p = scratch.state_dict(), ssl.state_dict(), enc.net.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(b[k], p[k]) for k in rep.matched)  # pretrained body
    assert all(torch.equal(a[k], b[k]) for k in rep.new)  # the same fresh head as the scratch run (same seed)
    x = torch.randn(2, 1, *ROI)
    with torch.no_grad():
        assert not torch.allclose(ssl.eval()(x), scratch.eval()(x))
        ssl.load_state_dict({k: a[k] for k in rep.matched}, strict=False)  # scratch's body back in
        torch.testing.assert_close(ssl(x), scratch(x), rtol=0, atol=0)  # → exactly scratch's logits
    # scratch UNet runs keep one optimizer param group (checkpoints of earlier runs resume); others split
    assert single_param_group(FinetuneConfig(**base))
    assert not single_param_group(FinetuneConfig(**base, init=f"ssl:{path}"))
    assert not single_param_group(FinetuneConfig(**base, llrd=0.5))


def test_depth_levels_freeze_and_lr_groups_of_the_pretrained_part() -> None:
    enc = _enc()
    net = build_downstream("UNet", recipe=enc.recipe, out_channels=2)
    rep = transfer_weights(net, _ckpt(enc), target="UNet")
    params = dict(net.named_parameters())
    depths = encoder_depths(net, "UNet")
    assert sorted(set(depths.values())) == [0, 1, 2, 3]  # down_0..down_2, bottom
    assert {k for k, d in depths.items() if d == 0} == {k for k in params if k.startswith("model.0.")}
    frozen = freeze_pretrained(net, "UNet", "monai_unet")
    assert set(frozen) == {k for k in rep.matched if k in params}  # exactly the transferred parameters
    assert all(not m.training for n, m in net.named_modules() if n.startswith("model.0"))
    net.train()
    net(torch.randn(2, 1, *ROI)).square().mean().backward()
    assert all(params[k].grad is None for k in frozen)
    assert all(p.grad is not None for k, p in params.items() if k.startswith(HEAD))
    groups = layerwise_lr_groups(net, "UNet", 1e-2, 1.0, pretrained=unet_key_prefixes("encoder")
                                 + unet_key_prefixes("decoder"), pretrained_scale=0.5)
    head = [g for g in groups if g["name"] == "head"]
    assert len(head) == 1 and set(head[0]["param_names"]) == {k for k in params if k.startswith(HEAD)}
    assert head[0]["lr"] == pytest.approx(1e-2) and all(g["lr"] == pytest.approx(5e-3) for g in groups
                                                        if g["name"] != "head")
