from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medssl.engines.pretrain import Pretrainer, build_components, run_pretraining
from medssl.engines.runtime.checkpoint import load_checkpoint, machine_info, machine_tag
from medssl.errors import ConfigMismatchError, MedsslError
from tests.engines.conftest import TOYS, toy_config

REPO = Path(__file__).resolve().parents[3]


def test_run_writes_checkpoints_encoder_and_metrics(tiny_datalist: Path, tmp_path: Path) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "run", total_steps=4, checkpoint_every=2, keep_checkpoints=1)
    res = run_pretraining(cfg, progress=True)
    assert [s for s, _ in res.loss_history] == [1, 2, 3, 4] and res.final_loss == res.loss_history[-1][1]
    assert [p.name for p in res.checkpoints] == ["step_0000004.pt"] and not (
        res.out_dir / "checkpoints" / "step_0000002.pt"
    ).exists()
    ckpt = load_checkpoint(res.last_checkpoint)
    assert set(ckpt) >= {
        "recipe",
        "config",
        "step",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "data",
        "augment",
    }
    assert ckpt["step"] == 4 and ckpt["scheduler"]["last_step"] == 4 and ckpt["data"]["position"] == 8 % 6
    assert ckpt["recipe"]["method"] == f"{TOYS}:toy_method" and ckpt["recipe"]["roi_size"] == [16, 16, 16]
    assert set(ckpt["recipe"]["versions"]) == {"medssl", "monai", "torch"} and ckpt["config"]["lr"] == 1e-2
    assert ckpt["recipe"]["machine"] == machine_info()  # the run's machine kind travels with its weights
    enc = torch.load(res.encoder_path, weights_only=True)
    assert enc["recipe"]["encoder"]["name"] == "tiny" and "net.0.weight" in enc["state_dict"]
    assert json.loads(res.encoder_json.read_text())["downstream_prefixes"] == {"TinyNet": "encoder."}
    lines = [json.loads(x) for x in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and {"loss", "lr", "pred_mean", "grad_norm"} <= set(
        lines[0]
    )
    assert lines[0]["lr"] == pytest.approx(5e-3)  # warm-up step 1 of 2


def test_checkpoint_round_trip_restores_every_state(tiny_datalist: Path, tmp_path: Path) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "rt", total_steps=3)
    torch.manual_seed(0)
    first = Pretrainer(cfg, *build_components(cfg))
    first.fit(progress=False)
    saved = first.state_dict()
    assert first.method.step_end == [(1, 3), (2, 3), (3, 3)]  # EMA hook after every optimizer step
    torch.manual_seed(123)  # different init and RNG: all of it must come from the checkpoint
    second = Pretrainer(cfg, *build_components(cfg))
    second.resume(first.out / "checkpoints" / "last.pt")
    assert second.step == 3 and second.schedule.last_step == 3
    assert second.batcher.state_dict() == first.batcher.state_dict()
    for k, v in first.method.state_dict().items():
        assert torch.equal(second.method.state_dict()[k], v), k
    opt_a, opt_b = saved["optimizer"]["state"], second.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a
    )
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert torch.equal(second.augment.generator.get_state(), saved["augment"]["generator"])


def _spawn(cfg_path: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    code = (
        "import sys; from medssl.config import PretrainConfig; from medssl.engines.pretrain.engine import "
        "run_pretraining; run_pretraining(PretrainConfig.from_yaml(sys.argv[1]), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(cfg_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_exact_resume_after_kill_9(tiny_datalist: Path, tmp_path: Path) -> None:
    n = 4
    straight = toy_config(tiny_datalist, tmp_path / "straight", total_steps=2 * n, checkpoint_every=n)
    killed = straight.replace(out_dir=str(tmp_path / "killed"))
    straight.to_yaml(tmp_path / "straight.yaml")
    killed.to_yaml(tmp_path / "killed.yaml")
    p_straight = _spawn(tmp_path / "straight.yaml", {})
    p_killed = _spawn(tmp_path / "killed.yaml", {"TOY_DELAY_S": "0.25"})  # slow steps: killed mid-run
    ckpt = Path(killed.out_dir) / "checkpoints" / f"step_{n:07d}.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and p_killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # now inside step n+1 or n+2
    assert p_killed.poll() is None, p_killed.stderr.read().decode()[-2000:]
    os.kill(p_killed.pid, signal.SIGKILL)
    p_killed.wait()
    assert p_straight.wait(timeout=120) == 0, p_straight.stderr.read().decode()[-2000:]
    assert not (Path(killed.out_dir) / "checkpoints" / f"step_{2 * n:07d}.pt").exists()
    done = [json.loads(x)["step"] for x in (Path(killed.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert max(done) < 2 * n  # really interrupted before the end

    resumed = run_pretraining(killed, resume=Path(killed.out_dir) / "checkpoints" / "last.pt", progress=False)
    ref = {
        json.loads(x)["step"]: json.loads(x)["loss"]
        for x in (Path(straight.out_dir) / "metrics.jsonl").read_text().splitlines()
    }
    assert [s for s, _ in resumed.loss_history] == list(range(n + 1, 2 * n + 1))
    for step, loss in resumed.loss_history:
        assert abs(loss - ref[step]) <= 1e-6, (step, loss, ref[step])
    # the run's own log: the lines the killed process wrote after step n were dropped, then rewritten
    killed_log = [json.loads(x) for x in (Path(killed.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in killed_log] == list(range(1, 2 * n + 1))
    assert all(abs(x["loss"] - ref[x["step"]]) <= 1e-6 for x in killed_log)
    a = load_checkpoint(Path(straight.out_dir) / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nonfinite_loss_skips_step_then_aborts(
    tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "nan", total_steps=5, method_kwargs={"nan_calls": [2]})
    with caplog.at_level(logging.WARNING, logger="medssl"):
        res = run_pretraining(cfg, progress=False)
    assert res.skipped_steps == [3] and [s for s, _ in res.loss_history] == [1, 2, 4, 5]
    assert "step 3: non-finite loss" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_checkpoint(res.last_checkpoint)["model"].values())
    bad = toy_config(
        tiny_datalist,
        tmp_path / "nan3",
        total_steps=8,
        max_nan_steps=3,
        method_kwargs={"nan_calls": [1, 2, 3]},
    )
    with pytest.raises(MedsslError, match="3 consecutive steps had a non-finite loss"):
        run_pretraining(bad, progress=False)


def test_resume_from_other_method_or_encoder_names_both(tiny_datalist: Path, tmp_path: Path) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "a", total_steps=1)
    last = run_pretraining(cfg, progress=False).last_checkpoint
    other = cfg.replace(method=f"{TOYS}:ToyMethod", out_dir=str(tmp_path / "b"))
    with pytest.raises(
        ConfigMismatchError,
        match="method: 'tests.engines._toys:toy_method' != 'tests.engines._toys:ToyMethod'",
    ):
        run_pretraining(other, resume=last, progress=False)
    with pytest.raises(ConfigMismatchError, match="roi_size: \\[16, 16, 16\\] != \\[8, 8, 8\\]"):
        run_pretraining(cfg.replace(roi_size=[8, 8, 8]), resume=last, progress=False)


def test_grad_accumulation_matches_full_batch(tiny_datalist: Path, tmp_path: Path) -> None:
    common = dict(total_steps=3, augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0})
    full = run_pretraining(
        toy_config(tiny_datalist, tmp_path / "full", batch_size=4, **common), progress=False
    )
    acc = run_pretraining(
        toy_config(tiny_datalist, tmp_path / "acc", batch_size=2, grad_accum=2, **common), progress=False
    )
    for (_, a), (_, b) in zip(full.loss_history, acc.loss_history, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    ma, mb = (load_checkpoint(r.last_checkpoint)["model"] for r in (full, acc))
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)
    assert load_checkpoint(acc.last_checkpoint)["data"] == {
        "epoch": 1,
        "position": 6,
        "order_seed": 0,
    }  # 12 seen


def test_mlflow_run_has_params_metrics_and_artifacts(tiny_datalist: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(
        tiny_datalist,
        tmp_path / "tracked",
        total_steps=3,
        experiment="pretrain-test",
        tracking_uri=uri,
        preview=True,
        tags={"medssl.study": "unit"},
    )
    res = run_pretraining(cfg, progress=False)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    p = run.data.params
    assert p["lr"] == "0.01" and p["roi_size"] == "[16, 16, 16]" and p["augment_kwargs"] == "{}"
    assert p["method"] == f"{TOYS}:toy_method"
    t = run.data.tags
    assert t["medssl.kind"] == "pretrain" and t["medssl.seed"] == "0" and t["medssl.study"] == "unit"
    assert t["medssl.machine"] == machine_tag()
    assert res.timing["steps"] == 3 and float(t["medssl.s_per_step"]) == pytest.approx(res.timing["s_per_step"], abs=1e-4)
    assert len(t["medssl.data_hash"]) == 16
    for key in ("loss", "lr", "pred_mean", "grad_norm"):
        assert [m.step for m in client.get_metric_history(res.run_id, key)] == [1, 2, 3], key
    losses = [m.value for m in client.get_metric_history(res.run_id, "loss")]
    assert losses == pytest.approx([loss for _, loss in res.loss_history])
    top = {f.path for f in client.list_artifacts(res.run_id)}
    assert {"augment_preview.png", "config.yaml", "encoder"} <= top
    assert {f.path for f in client.list_artifacts(res.run_id, "encoder")} == {
        "encoder/encoder.pt",
        "encoder/encoder.json",
    }
    png = (res.out_dir / "augment_preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not (res.out_dir / "mlflow_spool.jsonl").exists()
    more = run_pretraining(cfg.replace(total_steps=5), resume=res.last_checkpoint, progress=False)
    assert more.run_id == res.run_id  # the resumed run continues the same MLflow run
    assert [m.step for m in client.get_metric_history(res.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert client.get_run(res.run_id).info.status == "FINISHED"


def test_real_method_augment_and_exact_inprocess_resume(tiny_datalist: Path, tmp_path: Path) -> None:
    """The real SimCLR + SegResNet encoder + BatchedSSLAugment: trains, previews, and resumes exactly."""
    pytest.importorskip("medssl.transforms.batched")
    pytest.importorskip("medssl.methods.simclr")
    common = dict(
        method="simclr",
        encoder="segresnet",
        augment=None,
        encoder_kwargs={"init_filters": 8, "blocks_down": [1, 1, 1, 1]},
        method_kwargs={},
        total_steps=4,
        source_size=[20, 20, 20],
    )
    straight = run_pretraining(
        toy_config(tiny_datalist, tmp_path / "s", preview=True, **common), progress=False
    )
    assert (tmp_path / "s" / "augment_preview.png").stat().st_size > 1000
    ckpt = load_checkpoint(straight.last_checkpoint)
    assert ckpt["recipe"]["encoder"]["name"] == "segresnet" and "generator" in ckpt["augment"]
    half = toy_config(tiny_datalist, tmp_path / "h", **{**common, "total_steps": 2})
    run_pretraining(half, progress=False)
    resumed = run_pretraining(
        half.replace(total_steps=4), resume=tmp_path / "h" / "checkpoints" / "last.pt", progress=False
    )
    assert [s for s, _ in resumed.loss_history] == [3, 4]
    for (_, a), (_, b) in zip(straight.loss_history[2:], resumed.loss_history, strict=True):
        assert abs(a - b) <= 1e-6


def test_run_skips_unreadable_volume_and_reports_it(
    tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = json.loads(tiny_datalist.read_text())
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes((tiny_datalist.parent / "vol0.nii.gz").read_bytes()[:200])  # a cut-off download
    items = [
        {"image": str(tiny_datalist.parent / it["image"]), "case_id": it["case_id"]}
        for it in data["unlabeled"]
    ]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"unlabeled": [*items[:3], {"image": str(bad), "case_id": "bad"}]}))
    with caplog.at_level(logging.WARNING, logger="medssl"):
        res = run_pretraining(toy_config(dl, tmp_path / "run", total_steps=4), progress=False)
    assert [s for s, _ in res.loss_history] == [1, 2, 3, 4]  # training went on
    assert list(res.skipped_volumes) == [str(bad)] and "truncated.nii.gz" in caplog.text
    assert json.loads((res.out_dir / "skipped_volumes.json").read_text()) == res.skipped_volumes


def test_epochs_define_total_steps_and_amp_is_cpu_safe(
    tiny_datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = toy_config(tiny_datalist, tmp_path / "ep", total_steps=0, epochs=2, amp="bf16", device="cpu")
    with caplog.at_level(logging.WARNING, logger="medssl"):
        res = run_pretraining(cfg, progress=False)
    assert len(res.loss_history) == 2 * 3  # 6 volumes / B=2 → 3 steps per epoch
    assert "amp=bf16 ignored on cpu" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(tiny_datalist: Path, tmp_path: Path, amp: str) -> None:
    cfg = toy_config(
        tiny_datalist, tmp_path / amp, amp=amp, device="cuda", deterministic=False, total_steps=3
    )
    res = run_pretraining(cfg, progress=False)
    assert len(res.loss_history) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in res.loss_history)
    scaler = load_checkpoint(res.last_checkpoint)["scaler"]
    assert bool(scaler) == (amp == "fp16")  # GradScaler only for fp16


def test_pretrain_on_real_hippocampus_volumes(hippocampus_dir: Path, tmp_path: Path) -> None:
    """Real MSD hippocampus MRI (uint8 and float32 files, scales 1e2–1e6) through the real method/augment."""
    pytest.importorskip("medssl.transforms.batched")
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii*"))[:6]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"unlabeled": [{"image": str(f), "case_id": f.name} for f in files]}))
    cfg = toy_config(
        dl,
        tmp_path / "hippo",
        method="simclr",
        encoder="resnet3d",
        augment=None,
        encoder_kwargs={"depth": 10, "widen_factor": 0.25},
        roi_size=[32, 32, 32],
        total_steps=3,
        deterministic=False,
    )
    res = run_pretraining(cfg, progress=False)
    assert len(res.loss_history) == 3 and all(math.isfinite(v) for _, v in res.loss_history)
    assert not res.skipped_volumes and res.encoder_path.exists()


def test_multi_channel_datalist_sets_in_channels(tmp_path: Path) -> None:
    from tests.engines.pretrain.test_data import write_two_channel

    dl = write_two_channel(tmp_path / "mc")
    res = run_pretraining(toy_config(dl, tmp_path / "run", total_steps=2), progress=False)
    ckpt = load_checkpoint(res.last_checkpoint)
    assert ckpt["recipe"]["in_channels"] == 2 and ckpt["config"]["in_channels"] == 2
    enc = torch.load(res.encoder_path, weights_only=True)
    assert enc["state_dict"]["net.0.weight"].shape[1] == 2 and enc["recipe"]["in_channels"] == 2
    with pytest.raises(MedsslError, match=r"in_channels=1 but the pretraining pool .* has 2 channel\(s\)"):
        run_pretraining(toy_config(dl, tmp_path / "bad", total_steps=2, in_channels=1), progress=False)


def _labelled_datalist(tiny_datalist: Path, tmp_path: Path) -> Path:
    """The 6 tiny volumes as labelled cases (label paths are only read by finetuning) of one patient each."""
    data = json.loads(tiny_datalist.read_text())
    items = [{"image": str(tiny_datalist.parent / it["image"]), "label": "unused.nii.gz", "case_id": it["case_id"]}
             for it in data["unlabeled"]]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    return dl


def test_pretraining_with_splits_uses_and_records_the_study_wide_pool(tiny_datalist: Path, tmp_path: Path) -> None:
    import hashlib

    from medssl.data.splits import split_datalist
    from medssl.engines.finetune.leakage import check_pretrain_leakage

    dl = _labelled_datalist(tiny_datalist, tmp_path)
    path, sp = split_datalist(dl, fractions=[100], seeds=[0, 1], test_fraction=0.2, val_fraction=0.2)
    held = set(sp["test"]) | set(sp["seeds"]["0"]["validation"]) | set(sp["seeds"]["1"]["validation"])
    assert sp["seeds"]["0"]["validation"] != sp["seeds"]["1"]["validation"] and len(held) == 3
    res = run_pretraining(toy_config(dl, tmp_path / "run", total_steps=2, splits=str(path)), progress=False)
    recipe = torch.load(res.encoder_path, weights_only=True)["recipe"]
    pool = recipe["pool"]
    assert pool["case_ids"] == sp["pretrain_pool"] and not held & set(pool["case_ids"])
    assert pool["source"] == "pretrain_pool" and pool["splits_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(pool["fingerprint"]) == 16 and load_checkpoint(res.last_checkpoint)["recipe"]["pool"] == pool
    for s in ("0", "1"):  # one encoder serves every seed
        check_pretrain_leakage(recipe, sp["seeds"][s]["validation"], sp["test"], source=str(res.encoder_path))
    # the old default (seed 0's own pool) saw seed 1's validation cases: refused for seed 1
    seed0 = run_pretraining(toy_config(dl, tmp_path / "s0", total_steps=2, splits=str(path), split_seed=0),
                            progress=False)
    recipe0 = torch.load(seed0.encoder_path, weights_only=True)["recipe"]
    assert recipe0["pool"]["source"] == "unlabeled[0]"
    with pytest.raises(MedsslError, match=r"pretrained on 1 validation case\(s\)"):
        check_pretrain_leakage(recipe0, sp["seeds"]["1"]["validation"], sp["test"], source="s0")
    # resuming on another pool would hide what the encoder saw
    other = toy_config(dl, tmp_path / "run", total_steps=4, splits=str(path), split_seed=0)
    with pytest.raises(MedsslError, match="another pool"):
        Pretrainer(other, *build_components(other)).resume(res.last_checkpoint)
