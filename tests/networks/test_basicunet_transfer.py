"""Models Genesis → BasicUNet: the whole pretrained encoder-decoder transfers, only ``final_conv`` is new."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.downstream import (
    EncoderWarmup,
    build_downstream,
    downstream_features,
    encoder_depths,
    encoder_keys,
    freeze_encoder,
    layerwise_lr_groups,
    scratch_recipe,
    transfer_keys,
)
from medssl.networks.encoders import build_encoder
from medssl.networks.transfer import TransferError, load_ssl_checkpoint, transfer_weights

FEATURES = [4, 4, 8, 8, 16, 4]
ROI = [32, 32, 32]  # BasicUNet halves 4 times; instance norm needs > 1 voxel at the bottom
ENC = ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")
DEC = ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.")


def genesis_pretraining(tmp: Path, features: list[int] = FEATURES):
    """A real 2-step Models Genesis pretraining (engine, default genesis augmentation) on 2 tiny volumes."""
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    cfg = toy_config(
        write_volumes(tmp / "vols", n=2),
        tmp / "pre",
        method="genesis",
        encoder="unet",
        augment=None,
        encoder_kwargs={"features": list(features)},
        method_kwargs={},
        roi_size=ROI,
        source_size=ROI,
        total_steps=2,
        warmup_steps=1,
        target_spacing=[1.0, 1.0, 1.0],
    )
    return run_pretraining(cfg, progress=False)


@pytest.fixture(scope="module")
def genesis(tmp_path_factory: pytest.TempPathFactory):
    return genesis_pretraining(tmp_path_factory.mktemp("genesis"))


def test_encoder_and_decoder_transfer_only_final_conv_new(genesis) -> None:
    for src in (genesis.last_checkpoint, genesis.encoder_path):
        ckpt = load_ssl_checkpoint(src)
        pre = {k[len("net.") :]: v for k, v in ckpt.encoder_state.items()}
        torch.manual_seed(7)  # another init than the pretrained one
        net = build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=3).eval()
        head0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("final_conv.")}
        rep = transfer_weights(net, ckpt, target="BasicUNet")
        state = net.state_dict()
        body = [k for k in state if k.startswith(ENC + DEC)]
        assert set(body) | set(head0) == set(state)  # nothing else in a BasicUNet
        for k in body:
            assert torch.equal(state[k], pre[k]), k
        assert all(torch.equal(state[k], v) for k, v in head0.items())  # final_conv untouched
        assert pre["final_conv.weight"].shape[0] == 1 and state["final_conv.weight"].shape[0] == 3
        # report: every encoder and decoder tensor matched, final_conv expected-new, nothing else
        assert rep.share == 1.0 and not (rep.missing or rep.unexpected or rep.mismatched)
        assert rep.matched == transfer_keys(net, "BasicUNet") == body
        n_dec = sum(k.startswith(DEC) for k in body)
        assert n_dec > 0 and len(rep.matched_decoder) == n_dec and sorted(rep.new) == sorted(head0)
        d = rep.to_dict()
        assert (d["n_matched"], d["n_matched_decoder"], d["n_new"]) == (len(body), n_dec, len(head0))
        text = rep.render()
        assert f"{len(body) - n_dec} encoder, {n_dec} decoder" in text and "final_conv.*" in text
        assert "new (not pretrained)" in text and "encoder+decoder" in rep.summary()
        assert any("final_conv" in n and "not transferred" in n for n in rep.notes)
    # same maps as the pretrained encoder; with its restoration head the net IS the pretrained U-Net
    enc = ckpt.encoder().eval()
    one = build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=1).eval()
    transfer_weights(one, ckpt, target="BasicUNet")
    x = torch.randn(1, 1, *ROI)
    with torch.no_grad():
        for a, b in zip(enc.forward_features(x), downstream_features(one, "BasicUNet", x), strict=True):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(one(x), enc.reconstruct(x))  # final_conv is still a fresh one
        one.final_conv.load_state_dict({k[len("final_conv.") :]: v for k, v in pre.items() if "final_" in k})
        torch.testing.assert_close(one(x), enc.reconstruct(x))  # so the decoder came over in full


def test_scratch_builds_the_same_network_and_conflicts_are_named(genesis) -> None:
    ckpt = load_ssl_checkpoint(genesis.encoder_path)
    ssl = build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=3)
    recipe = scratch_recipe("BasicUNet", in_channels=1, img_size=ROI, features=FEATURES)
    assert recipe["name"] == "unet"
    assert recipe["downstream_kwargs"] == ckpt.encoder_recipe["downstream_kwargs"]
    scratch = build_downstream("BasicUNet", recipe=None, out_channels=3, in_channels=1, features=FEATURES)
    shapes = {k: v.shape for k, v in ssl.state_dict().items()}
    assert shapes == {k: v.shape for k, v in scratch.state_dict().items()}
    # an argument equal to the recipe's is fine; other features / a bias-free net would not take the weights
    build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=2, features=tuple(FEATURES), bias=True)
    with pytest.raises(ConfigMismatchError, match="features"):
        build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=2, features=[8, 8, 8, 8, 16, 8])
    with pytest.raises(ConfigMismatchError, match="bias: True != False"):
        build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=2, bias=False)
    assert "conv_0.conv_0.conv.bias" not in build_downstream(  # from scratch, bias is a free choice
        "BasicUNet", recipe=None, out_channels=2, in_channels=1, features=FEATURES, bias=False
    ).state_dict()
    seg = build_encoder("segresnet", img_size=(16, 16, 16), init_filters=8)
    with pytest.raises(MedsslError, match=r"cannot initialise a BasicUNet; it transfers to: \['SegResNet'\]"):
        build_downstream("BasicUNet", recipe=seg.recipe, out_channels=2)
    with pytest.raises(MedsslError, match=r"cannot initialise a SegResNet; it transfers to: \['BasicUNet'\]"):
        build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=2)


def test_other_features_fail_with_report_unless_partial(genesis) -> None:
    ckpt = load_ssl_checkpoint(genesis.encoder_path)
    wide = FEATURES[:4] + [32, FEATURES[5]]  # deepest level wider: down_4 and upcat_4 differ
    net = build_downstream("BasicUNet", recipe=None, out_channels=3, in_channels=1, features=wide)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TransferError, match="does not fit the BasicUNet") as ei:
        transfer_weights(net, ckpt, target="BasicUNet")
    rep, msg = ei.value.report, str(ei.value)
    bad = {k for k, _, _ in rep.mismatched}
    assert bad and all(k.startswith(("down_4.", "upcat_4.")) for k in bad)
    assert any(k.startswith("upcat_4.") for k in bad)  # decoder mismatches are reported like encoder ones
    assert "shape mismatch" in msg and "down_4.convs.conv_0.conv.weight" in msg and "(16, 8, 3, 3, 3)" in msg
    assert 0.0 < rep.share < 1.0 and sorted(rep.new) == ["final_conv.bias", "final_conv.weight"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded
    rep = transfer_weights(net, ckpt, target="BasicUNet", allow_partial=True)
    assert torch.equal(net.state_dict()["upcat_1.convs.conv_0.conv.weight"],
                       ckpt.encoder_state["net.upcat_1.convs.conv_0.conv.weight"])
    deep = "down_4.convs.conv_0.conv.weight"
    assert torch.equal(net.state_dict()[deep], before[deep])  # the mismatched ones keep their init


def test_freeze_llrd_and_warmup_groups(genesis) -> None:
    ckpt = load_ssl_checkpoint(genesis.encoder_path)
    net = build_downstream("BasicUNet", recipe=ckpt.recipe, out_channels=3)
    transfer_weights(net, ckpt, target="BasicUNet")
    params = dict(net.named_parameters())
    assert set(encoder_keys(net, "BasicUNet")) >= {k for k in params if k.startswith(ENC)}
    depths = encoder_depths(net, "BasicUNet")
    assert set(depths) == {k for k in params if k.startswith(ENC)}
    assert sorted(set(depths.values())) == [0, 1, 2, 3, 4]
    assert depths["conv_0.conv_0.conv.weight"] == 0 and depths["down_3.convs.conv_1.conv.weight"] == 3
    groups = layerwise_lr_groups(net, "BasicUNet", base_lr=1e-2, decay=0.5)
    head = groups[0]
    assert head["name"] == "head" and not head["encoder"] and head["lr"] == pytest.approx(1e-2)
    # the pretrained decoder trains with the head (documented choice), final_conv too
    assert set(head["param_names"]) == {k for k in params if k.startswith(DEC + ("final_conv.",))}
    assert [g["depth"] for g in groups[1:]] == [4, 3, 2, 1, 0] and all(g["encoder"] for g in groups[1:])
    assert groups[-1]["lr"] == pytest.approx(1e-2 * 0.5**5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(params)
    opt = torch.optim.AdamW(groups)
    assert EncoderWarmup(1).apply(opt, 0) == 0.0  # warm-up holds the encoder only, not the decoder
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-2)] + [0.0] * 5
    frozen = freeze_encoder(net, "BasicUNet")
    assert set(frozen) == set(depths)
    net(torch.randn(2, 1, *ROI)).square().mean().backward()
    assert all(params[k].grad is None for k in frozen)
    assert all(p.grad is not None for k, p in params.items() if k not in frozen)
