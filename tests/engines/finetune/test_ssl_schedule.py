"""The finetuning schedule of pretrained weights (``FinetuneConfig.ssl_schedule``): a frozen phase in which only
the new layers train (pretrained norm statistics held), a linear warm-up of the pretrained part's lr to
``encoder_lr_scale`` × the cosine, exact resume across the switch, scratch runs and old config hashes unchanged."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.engine import Finetuner, run_finetune
from medssl.engines.finetune.identity import config_hash, config_identity
from medssl.engines.runtime import schedules
from medssl.engines.runtime.checkpoint import load_checkpoint, save_encoder
from medssl.engines.runtime.schedules import pretrained_lr_factor, resolve_ssl_schedule, warmup_cosine
from medssl.errors import MedsslError
from medssl.networks.encoders import build_encoder
from tests.engines.finetune._crash import crash_at_epoch
from tests.engines.finetune._cubes import cube_study

ROI = [16, 16, 16]
BN_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": "BATCH"}
PRE = ("convInit.", "down_layers.", "up_samples.", "up_layers.")  # SparK fills the whole U-Net
SCHED = {"freeze_steps": 2, "warmup_steps": 2, "encoder_lr_scale": 0.5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """5 cases of 16³ voxels (noise + a bright 6³ cube labelled 1): 3 training, 1 validation, 1 test."""
    return cube_study(tmp_path_factory.mktemp("sched"))


def _encoder(folder: Path, family: str) -> str:
    torch.manual_seed(3)
    enc = build_encoder(family, in_channels=1, img_size=ROI, **BN_NET)
    method = "spark" if family == "segresnet_unet" else "simclr"
    recipe = dict(encoder=enc.recipe, method=method, in_channels=1, roi_size=ROI, target_spacing=None,
                  normalisation="none", ct_window=[-1000.0, 1000.0])
    return str(save_encoder(folder, enc, recipe)[0])


@pytest.fixture(scope="module")
def spark_pt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _encoder(tmp_path_factory.mktemp("spark"), "segresnet_unet")


def _cfg(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(datalist=str(data[0]), splits=str(data[1]), network="SegResNet", network_kwargs={},
                out_channels=2, roi_size=ROI, normalisation="none", batch_size=1, num_samples=1, max_steps=6,
                lr=1e-2, min_lr=0.0, sw_overlap=0.0, sw_batch_size=1, device="cpu", deterministic=True,
                out_dir=str(out), experiment=None, augment={"flip_prob": 0.0})
    return FinetuneConfig(**(base | kw))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(2, 1, *ROI, generator=g) > 0.7).float()
    return {"image": torch.randn(2, 1, *ROI, generator=g) + label, "label": label}


def _snap(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_auto_resolves_from_the_run_length_and_scratch_ignores_it() -> None:
    assert resolve_ssl_schedule("auto", total_steps=400, init_kind="ssl") == {
        "freeze_steps": 40, "warmup_steps": 40, "encoder_lr_scale": 0.5, "llrd": None}
    assert resolve_ssl_schedule("AUTO", total_steps=100, init_kind="ssl")["freeze_steps"] == 20  # at least 20
    assert resolve_ssl_schedule("auto", total_steps=40, init_kind="ssl")["warmup_steps"] == 10  # ≤ a quarter
    part = resolve_ssl_schedule({"encoder_lr_scale": 0.25}, total_steps=400, init_kind="ssl")
    assert part == {"freeze_steps": 40, "warmup_steps": 40, "encoder_lr_scale": 0.25, "llrd": None}
    assert resolve_ssl_schedule("auto", total_steps=400, init_kind="scratch") is None
    assert resolve_ssl_schedule("none", total_steps=400, init_kind="ssl") is None
    assert [pretrained_lr_factor(t, 2, 2) for t in range(6)] == [0, 0, 0.5, 1, 1, 1]
    assert [pretrained_lr_factor(t, 1, 0) for t in range(3)] == [0, 1, 1]
    assert FinetuneConfig(ssl_schedule=None).ssl_schedule == "none"
    for bad, word in (("fast", "ssl_schedule must be"), ({"freeze": 3}, r"unknown ssl_schedule key\(s\) \['freeze'\]"),
                      ({"encoder_lr_scale": 0}, "ssl_schedule.encoder_lr_scale"),
                      ({"freeze_steps": -1}, "ssl_schedule.freeze_steps"), ({"llrd": 1.5}, "ssl_schedule.llrd")):
        with pytest.raises(MedsslError, match=word):
            FinetuneConfig.from_dict({"ssl_schedule": bad})


def test_contradicting_options_are_refused_naming_the_fields() -> None:
    with pytest.raises(MedsslError, match=r"freeze_encoder=true .* contradicts ssl_schedule='auto'"):
        FinetuneConfig.from_dict({"ssl_schedule": "auto", "freeze_encoder": True})
    with pytest.raises(MedsslError, match=r"encoder_warmup_steps=5 and ssl_schedule="):
        FinetuneConfig.from_dict({"ssl_schedule": {"freeze_steps": 3}, "encoder_warmup_steps": 5})
    with pytest.raises(MedsslError, match=r"llrd=0.5 and ssl_schedule.llrd=0.7 are both set"):
        FinetuneConfig.from_dict({"ssl_schedule": {"llrd": 0.7}, "llrd": 0.5})
    ok = FinetuneConfig.from_dict({"ssl_schedule": "auto", "llrd": 0.5})  # top-level llrd combines with auto
    assert ok.llrd == 0.5 and ok.ssl_schedule == "auto"
    assert FinetuneConfig.from_dict({"freeze_encoder": True, "encoder_warmup_steps": 5}).freeze_encoder  # as before


def test_frozen_phase_then_warmup_groups_lrs_grads_and_norm_statistics(data, spark_pt, tmp_path: Path) -> None:
    ft = Finetuner(_cfg(data, tmp_path / "run", init=f"ssl:{spark_pt}", ssl_schedule=SCHED))
    assert ft.cfg.ssl_schedule == SCHED | {"llrd": None} and ft.recipe["ssl_schedule"] == ft.cfg.ssl_schedule
    groups = {g["name"]: g for g in ft.optimizer.param_groups}
    assert set(groups) == {"head", "decoder", "encoder.depth0", "encoder.depth1", "encoder.depth2"}
    assert all(k.startswith("conv_final.") for k in groups["head"]["param_names"]) and not groups["head"]["pretrained"]
    assert all(k.startswith(("up_samples.", "up_layers.")) for k in groups["decoder"]["param_names"])
    assert all(g["pretrained"] and g["lr_scale"] == 0.5 for n, g in groups.items() if n != "head")
    pre_mods = [m for n, m in ft.model.named_modules() if n.startswith(tuple(p[:-1] for p in PRE))]
    ft.model.train()
    lr = 1e-2
    for t in range(6):
        before = _snap(ft.model)
        ft.train_step(_batch(t))
        after = _snap(ft.model)
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        cos = warmup_cosine(t, lr, 0.0, 6)
        lrs = {g["name"]: g["lr"] for g in ft.optimizer.param_groups}
        assert lrs["head"] == pytest.approx(cos)
        pre_lr = cos * 0.5 * [0, 0, 0.5, 1, 1, 1][t]  # frozen, ramp 0.5 → 1, then 0.5 × the cosine
        assert lrs["decoder"] == pytest.approx(pre_lr) and lrs["encoder.depth0"] == pytest.approx(pre_lr)
        assert any(k.startswith("conv_final.") and k.endswith("weight") for k in moved)  # the new head trains
        pre_moved = {k for k in moved if k.startswith(PRE)}
        if t < 2:  # frozen: no gradients, no update, running statistics held, modules in eval mode
            assert not pre_moved, (t, sorted(pre_moved)[:3])
            assert all(p.grad is None and not p.requires_grad
                       for k, p in ft.model.named_parameters() if k.startswith(PRE))
            assert not any(m.training for m in pre_mods)
            assert any(k.startswith("conv_final.") and "running_mean" in k for k in moved)  # the head's norm learns
        else:  # released exactly at step 2: weights and statistics of encoder and decoder move
            assert all(m.training for m in pre_mods)
            assert any(k.startswith("down_layers.") and "running_mean" in k for k in pre_moved)
            assert any(k.startswith("up_layers.") and k.endswith("weight") for k in pre_moved)
            assert any(k.startswith("convInit.") for k in pre_moved)


def test_encoder_only_family_trains_its_new_decoder_at_base_lr(data, tmp_path: Path) -> None:
    pt = _encoder(tmp_path / "enc", "segresnet")
    ft = Finetuner(_cfg(data, tmp_path / "run", init=f"ssl:{pt}", ssl_schedule="auto", llrd=0.5, max_steps=100))
    assert ft.cfg.ssl_schedule == {"freeze_steps": 20, "warmup_steps": 20, "encoder_lr_scale": 0.5, "llrd": None}
    groups = {g["name"]: g for g in ft.optimizer.param_groups}
    assert "decoder" not in groups and not groups["head"]["pretrained"]
    assert any(k.startswith("up_layers.") for k in groups["head"]["param_names"])  # new: trains from step 0
    assert groups["encoder.depth2"]["lr_scale"] == pytest.approx(0.5 * 0.5)  # scale × llrd ** (n - d), n = 3
    assert groups["encoder.depth0"]["lr_scale"] == pytest.approx(0.5 * 0.125)
    assert not any(p.requires_grad for k, p in ft.model.named_parameters() if k.startswith(("convInit.", "down_")))
    assert all(p.requires_grad for k, p in ft.model.named_parameters() if k.startswith(("up_", "conv_final.")))


def test_scratch_runs_are_unaffected(data, tmp_path: Path) -> None:
    net = {"network_kwargs": BN_NET}
    fts = [Finetuner(_cfg(data, tmp_path / s, ssl_schedule=s, **net)) for s in ("none", "auto")]
    assert fts[1].cfg.ssl_schedule == "none" and fts[1].recipe["ssl_schedule"] is None
    assert [g["name"] for g in fts[0].optimizer.param_groups] == [g["name"] for g in fts[1].optimizer.param_groups]
    assert not any("pretrained" in g for g in fts[1].optimizer.param_groups)
    assert all(p.requires_grad for p in fts[1].model.parameters())
    runs = [run_finetune(_cfg(data, tmp_path / f"run_{s}", ssl_schedule=s, **net), progress=False)
            for s in ("none", "auto")]
    a, b = (load_checkpoint(r.out_dir / "checkpoints" / "last.pt") for r in runs)
    losses = [r["train_loss"] for r in a["history"]]
    assert losses == [r["train_loss"] for r in b["history"]] and len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    ident = [config_identity(ft.cfg) for ft in fts]
    assert ident[0] == ident[1] and "ssl_schedule" not in ident[0]


def test_config_hash_unchanged_without_the_field_and_split_by_it() -> None:
    # hashes computed with the code before ssl_schedule existed (commit e1a04f7): earlier studies keep them
    assert config_hash(config_identity(FinetuneConfig())) == "1295015f20dc3170"
    ssl = {"init": "ssl:enc.pt", "lr": 2e-3, "llrd": 0.5, "max_steps": 400}
    sha = "ab" * 32
    assert config_hash(config_identity(ssl, encoder_sha256=sha)) == "8245b914a7649ca1"
    scratch = {"network_kwargs": {"init_filters": 8}, "augment": {"flip_axes": [0]}, "max_steps": 400}
    assert config_hash(config_identity(scratch)) == "7ddf59d23a30a950"
    assert config_hash(config_identity(scratch | {"ssl_schedule": "auto"})) == "7ddf59d23a30a950"  # scratch: no-op

    def h(**kw) -> str:
        return config_hash(config_identity(ssl | kw, encoder_sha256=sha))

    assert h(ssl_schedule="none") == "8245b914a7649ca1"
    auto = h(ssl_schedule="auto")
    assert auto != "8245b914a7649ca1"  # an SSL arm that changes schedule is another configuration
    assert h(ssl_schedule={"encoder_lr_scale": 0.5}) == auto  # the mapping "auto" stands for
    assert h(ssl_schedule={"encoder_lr_scale": 0.25}) != auto
    assert h(ssl_schedule={"freeze_steps": 40, "warmup_steps": 40}) != auto  # explicit steps: no rule


def test_auto_rule_enters_the_hash(monkeypatch) -> None:
    cfg = {"init": "ssl:enc.pt", "ssl_schedule": "auto"}
    before = config_hash(config_identity(cfg, encoder_sha256="cd" * 32))
    monkeypatch.setitem(schedules.AUTO_SSL_SCHEDULE, "freeze_share", 0.2)
    assert config_hash(config_identity(cfg, encoder_sha256="cd" * 32)) != before


def test_resume_inside_the_frozen_phase_matches_an_uninterrupted_run(
    data, spark_pt, tmp_path: Path, monkeypatch
) -> None:
    """3 steps per epoch, frozen for 4: the epoch-1 checkpoint (step 3) is inside the frozen phase."""
    sched = {"freeze_steps": 4, "warmup_steps": 1, "encoder_lr_scale": 0.5}
    straight = run_finetune(_cfg(data, tmp_path / "straight", init=f"ssl:{spark_pt}", ssl_schedule=sched),
                            progress=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = _cfg(data, tmp_path / "resumed", init=f"ssl:{spark_pt}", ssl_schedule=sched, experiment="sched",
               tracking_uri=uri)
    last = crash_at_epoch(cfg, 1, monkeypatch)
    assert load_checkpoint(last)["step"] == 3
    run_finetune(cfg, resume="auto", progress=False)
    a = load_checkpoint(straight.out_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"] == 6
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    # the resolved schedule is recorded: config.yaml / checkpoint config, recipe, MLflow params
    assert b["config"]["ssl_schedule"] == sched | {"llrd": None} and b["recipe"]["ssl_schedule"] == b["config"][
        "ssl_schedule"]
    params = mlflow.tracking.MlflowClient(uri).get_run(b["mlflow_run_id"]).data.params
    assert params["ssl_schedule.freeze_steps"] == "4" and params["ssl_schedule.encoder_lr_scale"] == "0.5"
