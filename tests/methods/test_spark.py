"""SparK masked image modelling on the whole SegResNet U-Net: masking, re-masking, loss, and the full path
pretraining (engine) → encoder.pt → SegResNet with encoder + decoder transferred → finetuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.methods import build_method
from medssl.methods.mae import patchify
from medssl.methods.spark import SparK, normalise_patches, upsample_mask
from medssl.networks.encoders import build_encoder

ROI = (16, 16, 16)
TINY = dict(init_filters=4, blocks_down=(1, 1, 2), blocks_up=(1, 1), norm=("GROUP", {"num_groups": 2}))


def _spark(seed: int = 0, **kw) -> SparK:
    torch.manual_seed(seed)
    enc = build_encoder("segresnet_unet", in_channels=1, img_size=ROI, **TINY)
    return build_method("spark", enc, **kw)


def _x(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, *ROI, generator=torch.Generator().manual_seed(seed))


def test_mask_ratio_and_transform_masks() -> None:
    m = _spark(mask_ratio=0.6)
    assert m.patch_size == (4, 4, 4)  # default: the encoder's total stride
    torch.manual_seed(0)
    grid = m.draw_mask(8, ROI)
    assert grid.shape == (8, 1, 4, 4, 4)
    assert grid.flatten(1).sum(1).tolist() == [round(0.6 * 64)] * 8  # exactly, per sample
    assert len({tuple(g.flatten().tolist()) for g in grid}) == 8  # drawn per sample
    out = m({"view1": _x(8)})
    assert float(out["masked_ratio"]) == pytest.approx(38 / 64)
    # a patch mask supplied by the transform (view1_mask) is used as is
    from medssl.transforms.masking import patch_mask

    vox = patch_mask(torch.rand(2, 64), 0.25, ROI, (4, 4, 4)).float()[:, None]  # (B, 1, D, H, W)
    torch.testing.assert_close(m.patch_mask_from_voxels(vox), torch.nn.functional.max_pool3d(vox, 4))
    out = m({"view1": _x(2), "view1_mask": vox})
    assert float(out["masked_ratio"]) == pytest.approx(16 / 64)
    with pytest.raises(ValueError, match=r"view size \(16, 16, 14\) is not divisible by patch_size"):
        m({"view1": torch.randn(1, 1, 16, 16, 14)})


def test_loss_counts_only_masked_patches_with_normalised_targets() -> None:
    m = _spark()
    x = _x()
    torch.manual_seed(3)
    grid = m.draw_mask(2, ROI)
    with torch.no_grad():
        pred = m.reconstruct(x, grid)
        base = m.loss_from(pred, x, grid)
        vox = (grid.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4) > 0)  # masked voxels
        changed_visible = torch.where(vox, pred, pred + 5.0)
        assert torch.equal(m.loss_from(changed_visible, x, grid), base)  # visible voxels do not count
        changed_masked = torch.where(vox, pred + 0.5, pred)
        assert not torch.allclose(m.loss_from(changed_masked, x, grid), base)  # masked ones do
        # reference: mean over masked patches of the squared error against per-patch normalised targets
        t = patchify(x, (4, 4, 4))
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        err = (patchify(pred, (4, 4, 4)) - t).square().mean(-1)  # (B, N)
        ref = (err * grid.flatten(1)).sum() / grid.sum()
        torch.testing.assert_close(base, ref)
        raw = _spark(norm_pix_loss=False).loss_from(pred, x, grid)  # switched off: raw intensities
        ref_raw = ((patchify(pred - x, (4, 4, 4)).square().mean(-1)) * grid.flatten(1)).sum() / grid.sum()
        torch.testing.assert_close(raw, ref_raw)
    n = normalise_patches(patchify(3.0 + 7.0 * x, (4, 4, 4)))
    torch.testing.assert_close(n.mean(-1), torch.zeros(n.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(-1), torch.ones(n.shape[:2]), atol=1e-4, rtol=0)
    assert torch.equal(normalise_patches(torch.full((1, 2, 8), 4.0)), torch.zeros(1, 2, 8))  # flat patch


def test_every_encoder_block_is_remasked_and_tokens_fill_before_the_decoder() -> None:
    m = _spark().eval()
    net = m.encoder.net
    x = _x() + 3.0  # no zeros by chance
    torch.manual_seed(5)
    grid = m.draw_mask(2, ROI)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (block, raw output, input of the next use)

    def hook(name: str):
        return lambda mod, inp, out: seen.append((name, inp[0].detach(), out.detach()))

    hooks = [net.convInit.register_forward_hook(hook("convInit"))]
    for i, stage in enumerate(net.down_layers):
        hooks += [b.register_forward_hook(hook(f"down_layers.{i}.{j}")) for j, b in enumerate(stage)]
    hooks.append(net.up_samples[0].register_forward_hook(hook("up_samples.0")))
    try:
        with torch.no_grad():
            m.reconstruct(x, grid)
    finally:
        for h in hooks:
            h.remove()
    assert [s[0] for s in seen][:3] == ["convInit", "down_layers.0.0", "down_layers.0.1"]

    def masked(t: torch.Tensor) -> torch.Tensor:
        """The patch mask on ``t``'s grid ``(B, 1, s, s, s)`` bool: 4 patches per side, ``s / 4`` voxels each."""
        return upsample_mask(grid, [t.shape[2] // 4] * 3).bool()

    # every block's input (= the previous block's re-masked output) is zero at every masked position
    blocks = [s for s in seen if s[0] != "up_samples.0"]
    assert len(blocks) == 1 + sum(len(s) for s in net.down_layers)
    leaks = 0
    for name, inp, out in blocks:
        mk = masked(inp).expand_as(inp)
        assert inp[mk].abs().max() == 0, f"input of {name} not zero where masked"
        assert inp[~mk].abs().max() > 0, name
        leaks += int(out[masked(out).expand_as(out)].abs().max() > 0)  # raw output, before re-masking
    assert leaks >= len(blocks) - 2  # convs/norms spread into masked positions: re-masking is not a no-op
    # the deepest map reaches the decoder with the mask token at masked positions, features elsewhere
    deep = seen[-1][1]
    mk = masked(deep).expand_as(deep)
    tok = m.mask_tokens[-1].detach().expand_as(deep)
    assert torch.equal(deep[mk], tok[mk]) and not torch.equal(deep[~mk], tok[~mk])
    feats = m.sparse_encode(x, [v.to(x) for v in m.stage_masks(grid)])
    for f in feats:
        assert f[masked(f).expand_as(f)].abs().max() == 0
    without = _spark(mask_tokens=False)
    assert without.mask_tokens is None and not any("mask_tokens" in k for k in without.state_dict())


def test_gradients_reach_encoder_decoder_and_tokens() -> None:
    m = _spark().train()
    m.zero_grad()
    m({"view1": _x()})["loss"].backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    for prefix in ("encoder.net.convInit.", "encoder.net.down_layers.", "encoder.net.up_samples.",
                   "encoder.net.up_layers.", "encoder.net.conv_final.", "mask_tokens."):
        sel = {k: g for k, g in grads.items() if k.startswith(prefix)}
        assert sel and all(g is not None and torch.isfinite(g).all() for g in sel.values()), prefix
        assert any(g.abs().sum() > 0 for g in sel.values()), prefix


def test_deterministic_with_a_seed_and_learns() -> None:
    def run(seed: int) -> list[float]:
        m = _spark(seed=0).train()
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        torch.manual_seed(seed)
        losses = []
        for _ in range(8):
            out = m({"view1": _x(2, seed=1)})
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(float(out["loss"].detach()))
        return losses

    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    assert min(a[-3:]) < a[0], a  # fixed volume, random masks: the reconstruction improves


def test_bad_arguments_are_named() -> None:
    half = build_encoder("segresnet", img_size=ROI, **TINY)
    with pytest.raises(ValueError, match="spark needs the 'segresnet_unet' encoder"):
        build_method("spark", half)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        _spark(mask_ratio=1.0)
    with pytest.raises(ValueError, match="multiples of the encoder's total stride 4"):
        _spark(patch_size=6)
    assert _spark(patch_size=(8, 4, 8)).grid_shape(ROI) == (2, 4, 2)


# -- pretraining (engine) → encoder.pt → SegResNet transfer → finetuning --------------------------------


@pytest.fixture(scope="module")
def spark_run(tmp_path_factory: pytest.TempPathFactory):
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    tmp = tmp_path_factory.mktemp("spark")
    cfg = toy_config(write_volumes(tmp / "vols", n=2), tmp / "pre", method="spark", encoder="segresnet_unet",
                     augment=None, encoder_kwargs=dict(TINY), method_kwargs={"mask_ratio": 0.6},
                     roi_size=list(ROI), source_size=list(ROI), total_steps=3, warmup_steps=1,
                     target_spacing=[1.0, 1.0, 1.0])
    return run_pretraining(cfg, progress=False)


def test_pretraining_writes_a_whole_unet_that_transfers(spark_run) -> None:
    import json

    from medssl.networks.downstream import build_downstream
    from medssl.networks.transfer import load_ssl_checkpoint, transfer_weights

    assert spark_run.encoder_path.is_file()
    rows = [json.loads(line) for line in (spark_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "masked_ratio" in r]
    assert len(steps) == 3 and all(r["masked_ratio"] == pytest.approx(38 / 64) for r in steps)
    ckpt = load_ssl_checkpoint(spark_run.encoder_path)
    assert ckpt.recipe["method"] == "spark" and ckpt.encoder_recipe["name"] == "segresnet_unet"
    pre = {k[len("net."):]: v for k, v in ckpt.encoder_state.items()}
    net = build_downstream("SegResNet", recipe=ckpt.recipe, out_channels=3)
    head0 = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("conv_final.")}
    rep = transfer_weights(net, ckpt, target="SegResNet")
    state = net.state_dict()
    moved = [k for k in state if not k.startswith("conv_final.")]
    assert rep.matched == moved and rep.share == 1.0 and sorted(rep.new) == sorted(head0)
    assert all(torch.equal(state[k], pre[k]) for k in moved)  # every transferred tensor, exactly
    assert all(torch.equal(state[k], v) for k, v in head0.items())
    assert rep.matched_decoder and not (rep.missing or rep.unexpected or rep.mismatched)


def test_finetunes_from_the_spark_checkpoint(spark_run, tmp_path: Path) -> None:
    from medssl.data.splits import split_datalist
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.engine import run_finetune
    from tests.engines.finetune.test_basicunet import _labelled_volumes

    datalist = _labelled_volumes(tmp_path / "seg", n=5)
    splits, _ = split_datalist(datalist, fractions=[100], seeds=[0], test_fraction=0.2, val_fraction=0.2)
    cfg = FinetuneConfig(datalist=str(datalist), splits=str(splits), network="SegResNet", network_kwargs={},
                         out_channels=3, roi_size=list(ROI), batch_size=2, num_samples=1, max_steps=2,
                         sw_overlap=0.0, lr=1e-2, device="cpu", deterministic=True, out_dir=str(tmp_path / "ft"),
                         experiment=None, init=f"ssl:{spark_run.encoder_path}", llrd=0.5,
                         encoder_warmup_steps=1)
    res = run_finetune(cfg, progress=False)
    tr = res.transfer
    assert tr["share"] == 1.0 and tr["n_missing"] == tr["n_mismatched"] == tr["n_unexpected"] == 0
    assert tr["n_matched_decoder"] > 0 and {k.split(".")[0] for k in tr["new"]} == {"conv_final"}
    assert 0.0 <= res.test_metrics["dice_mean"] <= 1.0 and {"dice_1", "dice_2"} <= set(res.test_metrics)


def test_preset_crops_and_intensity_without_flips() -> None:
    from medssl.transforms.pipelines import resolve_params

    p = resolve_params("spark", ROI)
    assert p["flip_prob"] == 0.0 and p["mask"] == "none" and p["n_views"] == 1 and not p["targets"]
    assert p["scale_prob"] > 0 and p["shift_prob"] > 0
