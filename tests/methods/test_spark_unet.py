"""SparK on the MONAI residual UNet (``monai_unet``): masking and re-masking at every stage, loss on masked patches
only, and pretraining (engine) → encoder.pt → finetuning ``network: UNet`` with ``init: ssl`` and
``ssl_schedule: auto`` (every non-head key loaded, exactly those frozen first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.blocks import ResidualUnit

from medssl.methods import build_method
from medssl.methods.mae import patchify
from medssl.methods.spark import SparK, upsample_mask
from medssl.networks.encoders import build_encoder
from medssl.networks.encoders_unet import unet_blocks

ROI = (16, 16, 16)
TINY = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=2)  # total stride 4: 4³ patches, 4×4×4 grid


def _spark(seed: int = 0, enc_kw: dict | None = None, **kw) -> SparK:
    torch.manual_seed(seed)
    enc = build_encoder("monai_unet", in_channels=1, img_size=ROI, **(enc_kw or TINY))
    return build_method("spark", enc, **kw)


def _x(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, *ROI, generator=torch.Generator().manual_seed(seed)) + 3.0  # no zeros by chance


def _voxels(grid: torch.Tensor, patch: int = 4) -> torch.Tensor:
    return upsample_mask(grid, [patch] * 3).bool()  # (B, 1, D, H, W), True = masked


def test_patches_are_the_total_stride() -> None:
    m = _spark(mask_ratio=0.6)
    assert m.patch_size == (4, 4, 4) and m.strides == [(2, 2, 2), (4, 4, 4), (4, 4, 4)]
    assert [tuple(v.shape[2:]) for v in m.stage_masks(m.draw_mask(1, ROI))] == [(8, 8, 8), (4, 4, 4), (4, 4, 4)]
    out = m({"view1": _x()})
    assert float(out["masked_ratio"]) == pytest.approx(38 / 64)
    assert _spark(enc_kw=dict(channels=(4, 8, 16, 16), strides=(2, 2, 2))).patch_size == (8, 8, 8)
    aniso = _spark(enc_kw=dict(channels=(4, 8, 8), strides=([2, 2, 1], 2)))
    assert aniso.patch_size == (4, 4, 2) and aniso.grid_shape(ROI) == (4, 4, 8)
    with pytest.raises(ValueError, match="multiples of the encoder's total stride 4 .monai_unet"):
        _spark(patch_size=6)
    with pytest.raises(ValueError, match=r"total stride \(4, 4, 2\)"):
        _spark(enc_kw=dict(channels=(4, 8, 8), strides=([2, 2, 1], 2)), patch_size=(4, 4, 3))
    with pytest.raises(ValueError, match="'segresnet_unet' encoder or the 'monai_unet' one"):
        build_method("spark", build_encoder("unet", img_size=(16, 16, 16)))


def test_masked_input_voxels_do_not_change_any_visible_feature() -> None:
    m = _spark().eval()
    x = _x()
    torch.manual_seed(5)
    grid = m.draw_mask(2, ROI)
    vox = _voxels(grid)
    other = torch.where(vox, torch.randn_like(x) * 100.0, x)  # only masked voxels changed
    nudged = torch.where(vox, x, x + 0.1 * torch.randn_like(x))  # only visible voxels changed
    with torch.no_grad():
        vis = [v.to(x) for v in m.stage_masks(grid)]
        base, same, diff = (m.sparse_encode(t, vis) for t in (x, other, nudged))
        for f, v in zip(base, vis, strict=True):
            assert f[(v == 0).expand_as(f)].abs().max() == 0  # every map is zero where masked
        for a, b in zip(base, same, strict=True):
            assert torch.equal(a, b)  # stage 1 … bottom: identical, whatever the masked voxels held
        assert not torch.allclose(base[0], diff[0])  # visible voxels do count
        torch.testing.assert_close(m.reconstruct(other, grid), m.reconstruct(x, grid), rtol=0, atol=0)


def test_every_block_and_unit_is_remasked_at_its_resolution() -> None:
    m = _spark().eval()
    downs, bottom, ups = unet_blocks(m.encoder.net)
    x = _x()
    torch.manual_seed(6)
    grid = m.draw_mask(2, ROI)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module, input, raw output)

    def hook(name: str):
        return lambda mod, inp, out: seen.append((name, inp[0].detach(), out.detach()))

    hooks = []
    for i, block in enumerate([*downs, bottom]):
        assert isinstance(block, ResidualUnit)
        hooks.append(block.register_forward_hook(hook(f"block{i}")))
        hooks += [u.register_forward_hook(hook(f"block{i}.{n}")) for n, u in block.conv.named_children()]
    hooks.append(ups[-1].register_forward_hook(hook("up_deepest")))
    try:
        with torch.no_grad():
            m.reconstruct(x, grid)
    finally:
        for h in hooks:
            h.remove()
    names = [s[0] for s in seen]
    assert names[:4] == ["block0.unit0", "block0.unit1", "block0", "block1.unit0"]  # hooks fire inner → outer
    assert len([n for n in names if n.startswith("block")]) == 3 * 3  # 3 blocks × (2 units + block)
    leaks = 0
    for name, inp, out in seen:
        if name == "up_deepest" or name.endswith("unit1"):  # unit1's input is unit0's re-masked output
            continue
        mk = upsample_mask(grid, [inp.shape[2] // 4] * 3).bool().expand_as(inp)
        assert inp[mk].abs().max() == 0, f"input of {name} not zero where masked"
        assert inp[~mk].abs().max() > 0, name
        leaks += int(out[upsample_mask(grid, [out.shape[2] // 4] * 3).bool().expand_as(out)].abs().max() > 0)
    assert leaks >= 4  # convs/norms spread into masked positions: the re-masking is not a no-op
    for name, inp, _ in seen:
        if name.endswith("unit1"):
            mk = upsample_mask(grid, [inp.shape[2] // 4] * 3).bool().expand_as(inp)
            assert inp[mk].abs().max() == 0, f"{name}: unit0's output not re-masked"
    # the decoder gets the mask token at masked positions of the skip and bottom maps, no hooks left behind
    deep = seen[-1][1]  # cat([skip_1, bottom]) → (B, 8 + 16, 4, 4, 4)
    mk = upsample_mask(grid, [1] * 3).bool().expand(-1, 8, -1, -1, -1)
    assert torch.equal(deep[:, :8][mk], m.mask_tokens[1].detach().expand(2, 8, 4, 4, 4)[mk])
    assert not any(u._forward_hooks for b in [*downs, bottom] for u in b.conv)


def test_loss_counts_only_masked_patches_and_gradients_reach_everything() -> None:
    m = _spark()
    x = _x()
    torch.manual_seed(3)
    grid = m.draw_mask(2, ROI)
    vox = _voxels(grid)
    with torch.no_grad():
        pred = m.reconstruct(x, grid)
        base = m.loss_from(pred, x, grid)
        assert torch.equal(m.loss_from(torch.where(vox, pred, pred + 5.0), x, grid), base)
        assert not torch.allclose(m.loss_from(torch.where(vox, pred + 0.5, pred), x, grid), base)
        t = patchify(x, (4, 4, 4))
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        ref = ((patchify(pred, (4, 4, 4)) - t).square().mean(-1) * grid.flatten(1)).sum() / grid.sum()
        torch.testing.assert_close(base, ref)
    m.train().zero_grad()
    m({"view1": x})["loss"].backward()
    grads = {k: p.grad for k, p in m.named_parameters()}
    for prefix in ("encoder.net.model.0.", "encoder.net.model.1.submodule.0.",  # down blocks
                   "encoder.net.model.1.submodule.1.submodule.",  # bottom
                   "encoder.net.model.1.submodule.2.", "encoder.net.model.2.", "mask_tokens."):  # ups, tokens
        sel = {k: g for k, g in grads.items() if k.startswith(prefix)}
        assert sel and all(g is not None and torch.isfinite(g).all() for g in sel.values()), prefix
        assert any(g.abs().sum() > 0 for g in sel.values()), prefix


def test_learns_on_a_fixed_volume() -> None:
    m = _spark().train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        out = m({"view1": _x(2, seed=1)})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert min(losses[-3:]) < losses[0], losses


# -- pretraining (engine) → encoder.pt → finetuning network UNet ---------------------------------------


@pytest.fixture(scope="module")
def spark_unet_run(tmp_path_factory: pytest.TempPathFactory):
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    tmp = tmp_path_factory.mktemp("spark_unet")
    cfg = toy_config(write_volumes(tmp / "vols", n=2), tmp / "pre", method="spark", encoder="monai_unet",
                     augment=None, encoder_kwargs=dict(TINY), method_kwargs={"mask_ratio": 0.6},
                     roi_size=list(ROI), source_size=list(ROI), total_steps=3, warmup_steps=1,
                     target_spacing=[1.0, 1.0, 1.0])
    return run_pretraining(cfg, progress=False)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medssl.data.splits import split_datalist
    from tests.engines.finetune.test_basicunet import _labelled_volumes

    datalist = _labelled_volumes(tmp_path_factory.mktemp("seg"), n=5)
    splits, _ = split_datalist(datalist, fractions=[100], seeds=[0], test_fraction=0.2, val_fraction=0.2)
    return datalist, splits


def _ft_cfg(seg_data, out: Path, **kw):
    from medssl.engines.finetune.config import FinetuneConfig

    base = dict(datalist=str(seg_data[0]), splits=str(seg_data[1]), network="UNet", network_kwargs=dict(TINY),
                out_channels=3, roi_size=list(ROI), batch_size=2, num_samples=1, max_steps=2, sw_overlap=0.0,
                lr=1e-2, device="cpu", deterministic=True, out_dir=str(out), experiment=None)
    return FinetuneConfig(**(base | kw))


def test_pretraining_writes_a_whole_unet_that_finetunes(spark_unet_run, seg_data, tmp_path: Path) -> None:
    import json

    from medssl.engines.finetune.engine import run_finetune
    from medssl.networks.transfer import load_ssl_checkpoint

    rows = [json.loads(line) for line in (spark_unet_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "masked_ratio" in r]) == 3
    ckpt = load_ssl_checkpoint(spark_unet_run.encoder_path)
    assert ckpt.recipe["method"] == "spark" and ckpt.encoder_recipe["name"] == "monai_unet"
    assert ckpt.preprocessing["size_divisor"] == 4
    cfg = _ft_cfg(seg_data, tmp_path / "ft", init=f"ssl:{spark_unet_run.encoder_path}", ssl_schedule="auto",
                  network_kwargs="auto", roi_size="auto")
    res = run_finetune(cfg, progress=False)
    tr = res.transfer
    assert tr["share"] == 1.0 and tr["n_missing"] == tr["n_mismatched"] == tr["n_unexpected"] == 0
    assert tr["n_matched_decoder"] > 0 and tr["new"] and all(k.startswith("model.2.") for k in tr["new"])
    saved = (tmp_path / "ft" / "config.yaml").read_text()
    assert "network_kwargs: {}" in saved  # "auto" with an SSL init: the encoder recipe decides
    best = torch.load(tmp_path / "ft" / "checkpoints" / "best.pt", weights_only=True)
    assert best["recipe"]["build"]["recipe"]["kwargs"]["channels"] == list(TINY["channels"])
    assert all(s % 4 == 0 for s in best["recipe"]["roi_size"])  # planned patch, multiples of the total stride
    assert 0.0 <= res.test_metrics["dice_mean"] <= 1.0 and {"dice_1", "dice_2"} <= set(res.test_metrics)


def test_ssl_schedule_freezes_exactly_the_transferred_keys(spark_unet_run, seg_data, tmp_path: Path) -> None:
    from medssl.engines.finetune.engine import Finetuner

    torch.manual_seed(0)
    scratch = Finetuner(_ft_cfg(seg_data, tmp_path / "s", max_steps=400))
    torch.manual_seed(0)
    ft = Finetuner(_ft_cfg(seg_data, tmp_path / "a", init=f"ssl:{spark_unet_run.encoder_path}",
                           ssl_schedule="auto", max_steps=400))
    params = dict(ft.model.named_parameters())
    matched = set(ft.transfer["matched"])
    frozen = {k for k, p in params.items() if not p.requires_grad}
    assert ft.ssl_plan["freeze_steps"] == 40 and ft.pretrained_frozen
    assert frozen == matched & set(params) and frozen  # every transferred parameter, nothing else
    assert all(p.requires_grad for k, p in params.items() if k.startswith("model.2."))
    pre = {k for g in ft.optimizer.param_groups if g.get("pretrained") for k in g["param_names"]}
    assert pre == frozen  # the groups the schedule holds and ramps
    assert len(scratch.optimizer.param_groups) == 1  # scratch UNet: one group, as before
    # step 0: the SSL net = pretrained body + exactly the scratch run's fresh head (same seed)
    a, b = scratch.model.state_dict(), ft.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ft.transfer["new"])
    assert not all(torch.equal(a[k], b[k]) for k in matched)
