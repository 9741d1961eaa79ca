"""Weight transfer: SSL checkpoints as the pretraining engine writes them → downstream nets, with reports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from medssl.engines.runtime.checkpoint import atomic_save, save_encoder
from medssl.errors import ConfigMismatchError, MedsslError
from medssl.methods.base import build_method
from medssl.networks.downstream import build_downstream, downstream_features
from medssl.networks.transfer import (
    SSLCheckpoint,
    TransferError,
    check_preprocessing,
    load_ssl_checkpoint,
    transfer_weights,
)
from tests.networks.test_downstream import TINY, _encoder


def _recipe(enc, **over) -> dict:
    """A checkpoint recipe shaped like ``engines.components.make_recipe``."""
    img = list(enc.img_size)
    r = dict(encoder=enc.recipe, method="simclr", method_kwargs={}, in_channels=1, roi_size=img)
    r |= dict(target_spacing=[1.0, 1.0, 1.0], normalisation="robust", ct_window=[-1000.0, 1000.0])
    return r | over


def _save_both(enc, out: Path) -> tuple[Path, Path]:
    """Full pretraining checkpoint (method state dict) and encoder.pt, as the engine writes them."""
    method = build_method("simclr", enc, hidden_dim=8, out_dim=4)
    full = atomic_save(
        {"format": 1, "recipe": _recipe(enc), "model": method.state_dict(), "step": 3}, out / "ck.pt"
    )
    pt, _ = save_encoder(out, enc, _recipe(enc))
    return full, pt


@pytest.mark.parametrize("kind", sorted(TINY))
def test_full_transfer_and_same_features(kind: str, tmp_path: Path) -> None:
    enc = _encoder(kind, seed=0)
    full, pt = _save_both(enc, tmp_path)
    for src in (full, pt):
        ckpt = load_ssl_checkpoint(src)
        assert set(ckpt.encoder_state) == set(enc.state_dict())
        torch.manual_seed(123)  # a different init than the encoder's
        net = build_downstream(kind, recipe=ckpt.recipe, out_channels=2).eval()
        rep = transfer_weights(net, ckpt, target=kind)
        assert rep.share == 1.0 and not (rep.missing or rep.unexpected or rep.mismatched)
        assert len(rep.matched) == len(enc.export_state_dict(kind)) and rep.source == str(src)
        assert "100.0 %" in rep.summary() and rep.to_dict()["n_matched"] == len(rep.matched)
    x = torch.randn(1, 1, *TINY[kind]["img_size"])
    with torch.no_grad():
        want, got = enc.forward_features(x), downstream_features(net, kind, x)
        fresh = downstream_features(
            build_downstream(kind, recipe=ckpt.recipe, out_channels=2).eval(), kind, x
        )
    assert not torch.allclose(want[-1], fresh[-1])  # an untransferred net computes something else
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b)
    pre = ckpt.preprocessing
    assert pre["target_spacing"] == [1.0, 1.0, 1.0] and pre["in_channels"] == 1
    assert pre["normalisation"] == "robust" and pre["roi_size"] == list(TINY[kind]["img_size"])


def test_wrong_size_checkpoint_fails_with_mismatch_table(tmp_path: Path) -> None:
    _, pt = _save_both(_encoder("SwinUNETR", feature_size=12), tmp_path)
    ckpt = load_ssl_checkpoint(pt)
    net = build_downstream(
        "SwinUNETR", recipe=None, out_channels=2, in_channels=1, **TINY["SwinUNETR"] | {"feature_size": 24}
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TransferError) as ei:
        transfer_weights(net, ckpt, target="SwinUNETR")
    msg = str(ei.value)
    assert isinstance(ei.value, MedsslError) and "does not fit the SwinUNETR" in msg
    assert "shape mismatch" in msg and "swinViT.patch_embed.proj.weight" in msg
    assert "(12, 1, 2, 2, 2)" in msg and "(24, 1, 2, 2, 2)" in msg
    assert ei.value.report.mismatched and ei.value.report.share < 1.0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded
    # a different encoder family: nothing matches, refused even with allow_partial
    seg = load_ssl_checkpoint(_save_both(_encoder("SegResNet"), tmp_path / "seg")[1])
    with pytest.raises(TransferError, match="no encoder weight matched") as ei:
        transfer_weights(net, seg, target="SwinUNETR", allow_partial=True)
    assert "transfers to: ['SegResNet']" in str(ei.value) and ei.value.report.unexpected


def test_partial_and_unexpected_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = _encoder("ResNet")
    state = {k: v for k, v in enc.state_dict().items() if not k.startswith("net.layer4.")}
    extra = {"net.extra.weight": torch.zeros(3), "projector.weight": torch.zeros(2)}
    ckpt = SSLCheckpoint(recipe=_recipe(enc), encoder_state=state | extra, source="mem")
    torch.manual_seed(5)
    net = build_downstream("ResNet", recipe=ckpt.recipe, out_channels=2)
    with pytest.raises(TransferError, match="missing") as ei:
        transfer_weights(net, ckpt, target="ResNet")
    assert "layer4.0.conv1.weight" in str(ei.value) and str(tuple(net.layer4[0].conv1.weight.shape)) in str(
        ei.value
    )
    init4 = net.layer4[0].conv1.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="medssl.networks.transfer"):
        rep = transfer_weights(net, ckpt, target="ResNet", allow_partial=True)
    assert "partial weight transfer" in caplog.text
    assert rep.missing and all(k.startswith("layer4.") for k in rep.missing)
    assert sorted(rep.unexpected) == sorted(extra) and 0.0 < rep.share < 1.0
    torch.testing.assert_close(net.conv1.weight, enc.net.conv1.weight)  # loaded
    assert torch.equal(net.layer4[0].conv1.weight, init4)  # kept its init
    # min_match below the loaded share passes without allow_partial; unexpected keys alone never fail
    assert transfer_weights(net, ckpt, target="ResNet", min_match=rep.share * 0.99).missing == rep.missing
    full = SSLCheckpoint(recipe=_recipe(enc), encoder_state=enc.state_dict() | extra)
    rep = transfer_weights(net, full, target="ResNet")
    assert rep.share == 1.0 and sorted(rep.unexpected) == sorted(extra)
    assert "unexpected" in rep.render() and "projector.weight" in rep.render()
    with pytest.raises(ValueError, match="min_match"):
        transfer_weights(net, full, target="ResNet", min_match=0.0)


def test_preprocessing_conflicts_named(caplog: pytest.LogCaptureFixture) -> None:
    swin = SSLCheckpoint(recipe=_recipe(_encoder("SwinUNETR")), encoder_state={})
    pre = swin.preprocessing
    assert pre["img_size"] is None and pre["size_divisor"] == 64
    ok = check_preprocessing(pre, {"target_spacing": [1.0, 1.0, 1.00001], "roi_size": [64, 64, 128]})
    assert ok["roi_size"] == [64, 64, 128] and ok["normalisation"] == "robust"  # inherited
    bad = {
        "target_spacing": [1.5, 1.5, 1.5],
        "normalisation": "ct",
        "in_channels": 2,
        "roi_size": [48, 48, 48],
    }
    with pytest.raises(ConfigMismatchError) as ei:
        check_preprocessing(pre, bad)
    assert set(ei.value.fields) == {"target_spacing", "normalisation", "in_channels", "roi_size"}
    msg = str(ei.value)
    assert (
        "[1.0, 1.0, 1.0] != [1.5, 1.5, 1.5]" in msg and "'robust' != 'ct'" in msg and "multiples of 64" in msg
    )
    with caplog.at_level(logging.WARNING, logger="medssl.networks.transfer"):
        merged = check_preprocessing(pre, bad, override=True)
    assert merged["in_channels"] == 2 and "normalisation: 'robust' -> 'ct'" in caplog.text
    vit = SSLCheckpoint(recipe=_recipe(_encoder("UNETR"), normalisation="ct"), encoder_state={}).preprocessing
    with pytest.raises(ConfigMismatchError, match="ViT img_size") as ei:
        check_preprocessing(vit, {"roi_size": [64, 64, 64], "ct_window": [-200.0, 300.0]})
    assert set(ei.value.fields) == {"roi_size", "ct_window"}
    # resampled vs native grid is a contradiction too
    with pytest.raises(ConfigMismatchError, match="target_spacing"):
        check_preprocessing(vit, {"target_spacing": None})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="not found"):
        load_ssl_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "norecipe.pt")
    with pytest.raises(MedsslError, match="no embedded recipe"):
        load_ssl_checkpoint(tmp_path / "norecipe.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(MedsslError, match="cannot read"):
        load_ssl_checkpoint(tmp_path / "junk.pt")
    enc = _encoder("SegResNet")
    torch.save({"recipe": _recipe(enc), "model": {"head.w": torch.zeros(1)}}, tmp_path / "noenc.pt")
    with pytest.raises(MedsslError, match="no encoder weights"):
        load_ssl_checkpoint(tmp_path / "noenc.pt")
    # a bare encoder recipe + "encoder" weights, and a folder holding encoder.pt
    torch.save({"recipe": enc.recipe, "encoder": enc.state_dict()}, tmp_path / "bare.pt")
    bare = load_ssl_checkpoint(tmp_path / "bare.pt")
    assert bare.encoder_recipe == enc.recipe and "target_spacing" not in bare.preprocessing
    assert check_preprocessing(bare.preprocessing, {"target_spacing": [2.0, 2.0, 2.0]})["in_channels"] == 1
    save_encoder(tmp_path / "run", enc, _recipe(enc))
    assert set(load_ssl_checkpoint(tmp_path / "run").encoder_state) == set(enc.state_dict())


def test_mlflow_uris(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    enc = _encoder("SegResNet")
    _, pt = _save_both(enc, tmp_path / "out")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("pretrain", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(pt), "encoder")
    client.set_terminated(run_id)
    client.create_registered_model("ssl-encoder")
    client.create_model_version("ssl-encoder", source=f"runs:/{run_id}/encoder", run_id=run_id)
    for src in (f"runs:/{run_id}/encoder/encoder.pt", f"runs:/{run_id}/encoder", "models:/ssl-encoder/1"):
        ckpt = load_ssl_checkpoint(src, tracking_uri=uri)
        assert ckpt.source == src and ckpt.recipe["normalisation"] == "robust"
        for k, v in enc.state_dict().items():
            torch.testing.assert_close(ckpt.encoder_state[k], v)
    net = build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=2)
    assert transfer_weights(net, ckpt, target="SegResNet").share == 1.0
    with pytest.raises(MedsslError, match="cannot download"):
        load_ssl_checkpoint("models:/no-such-model/3", tracking_uri=uri)


def test_real_pretraining_run_transfers(tmp_path: Path) -> None:
    """End to end with the pretraining engine's own files: last checkpoint and encoder.pt both load fully."""
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    datalist = write_volumes(tmp_path / "vols", n=2)
    cfg = toy_config(
        datalist,
        tmp_path / "run",
        method="simclr",
        encoder="segresnet",
        augment=None,
        encoder_kwargs={"init_filters": 8, "blocks_down": [1, 1, 1, 1]},
        method_kwargs={"hidden_dim": 8, "out_dim": 4},
        total_steps=2,
        warmup_steps=1,
        source_size=[20, 20, 20],
        target_spacing=[1.0, 1.0, 1.0],
    )
    res = run_pretraining(cfg, progress=False)
    ckpts = [load_ssl_checkpoint(res.last_checkpoint), load_ssl_checkpoint(res.encoder_path)]
    for a, b in zip(ckpts[0].encoder_state.values(), ckpts[1].encoder_state.values(), strict=True):
        torch.testing.assert_close(a, b)
    for ckpt in ckpts:
        net = build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=3)
        assert transfer_weights(net, ckpt, target="SegResNet").share == 1.0
        torch.testing.assert_close(net.convInit.conv.weight, ckpt.encoder_state["net.convInit.conv.weight"])
        pre = ckpt.preprocessing
        assert pre["roi_size"] == [16, 16, 16] and pre["target_spacing"] == [1.0, 1.0, 1.0]
        assert pre["normalisation"] == cfg.normalisation and pre["size_divisor"] == 8
        check_preprocessing(pre, {"roi_size": [32, 32, 32], "target_spacing": [1.0, 1.0, 1.0]})
