"""Finetuning engine on real data: hippocampus segmentation and AdrenalMNIST3D classification (tiny nets,
1–3 epochs, CPU), SSL init from a real pretraining checkpoint, bad inputs, early stopping, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.data.medmnist import convert_medmnist
from medssl.data.splits import split_datalist
from medssl.engines.finetune import Finetuner, build_model, rebuild_model, run_finetune
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.runtime.checkpoint import load_checkpoint, machine_info, machine_tag
from medssl.errors import ConfigMismatchError, MedsslError
from medssl.networks.transfer import TransferError
from tests.engines.finetune._crash import crash_at_epoch

SEG_NET = {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}
CLS_NET = {"depth": 10, "widen_factor": 0.125, "conv1_t_size": 3, "conv1_t_stride": 2}
SEG_METRICS = {"dice_1", "dice_2", "dice_mean", "hd95_1", "hd95_2", "hd95_mean"}
SEG_METRICS |= {"missed_1", "missed_2", "hd95_penalised_1", "hd95_penalised_2", "cases"}  # metrics.py counts
CLS_METRICS = {"auc", "accuracy", "balanced_accuracy"}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def hippo(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """6 real hippocampus cases: 4 training (50 % = 2), 1 validation, 1 test."""
    tmp = tmp_path_factory.mktemp("hippo")
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:6]
    items = [
        {
            "image": str(p),
            "label": str(hippocampus_dir / "labelsTr" / p.name),
            "case_id": p.name[: -len(".nii.gz")],
        }
        for p in images
    ]
    (tmp / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(
        tmp / "datalist.json", fractions=[50, 100], seeds=[0], test_fraction=0.2, val_fraction=0.2
    )
    return tmp / "datalist.json", splits


@pytest.fixture(scope="module")
def adrenal(medmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 real AdrenalMNIST3D 28³ volumes (official splits subsampled: train 16/8, val 4/4, test 4/4 of
    class 0/1) converted with ``convert_medmnist``; fractions 25 % (4 + 2 cases) and 100 %."""
    tmp = tmp_path_factory.mktemp("adrenal")
    z = np.load(medmnist_dir / "adrenalmnist3d.npz")
    arrays = {}
    for split, (n0, n1) in {"train": (16, 8), "val": (4, 4), "test": (4, 4)}.items():
        lab = z[f"{split}_labels"][:, 0]
        idx = np.concatenate([np.flatnonzero(lab == 0)[:n0], np.flatnonzero(lab == 1)[:n1]])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = (
            z[f"{split}_images"][idx],
            z[f"{split}_labels"][idx],
        )
    np.savez(tmp / "adrenalmnist3d.npz", **arrays)
    items = convert_medmnist(tmp / "adrenalmnist3d.npz", tmp / "nifti", salt="finetune-test")
    sections = {s: [it for it in items if it["split"] == s] for s in ("training", "validation", "test")}
    (tmp / "datalist.json").write_text(json.dumps(sections))
    splits, _ = split_datalist(tmp / "datalist.json", fractions=[25, 100], seeds=[0])
    return tmp / "datalist.json", splits


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory: pytest.TempPathFactory):
    """A real 2-step SimCLR pretraining of the SegResNet encoder that ``SEG_NET`` builds."""
    from medssl.engines.pretrain.engine import run_pretraining
    from tests.engines.conftest import toy_config, write_volumes

    tmp = tmp_path_factory.mktemp("ssl")
    enc = {k: v for k, v in SEG_NET.items()}
    cfg = toy_config(
        write_volumes(tmp / "vols", n=2),
        tmp / "pre",
        method="simclr",
        encoder="segresnet",
        augment=None,
        encoder_kwargs=enc,
        method_kwargs={"hidden_dim": 8, "out_dim": 4},
        total_steps=2,
        warmup_steps=1,
        source_size=[20, 20, 20],
        target_spacing=[1.0, 1.0, 1.0],
    )
    return run_pretraining(cfg, progress=False)


def seg_config(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(
        datalist=str(data[0]),
        splits=str(data[1]),
        fraction=100,
        network="SegResNet",
        network_kwargs=SEG_NET,
        out_channels=3,
        roi_size=[16, 16, 16],
        batch_size=2,
        num_samples=2,
        max_epochs=2,
        sw_overlap=0.0,
        sw_batch_size=8,
        lr=1e-2,
        device="cpu",
        deterministic=True,
        out_dir=str(out),
        experiment=None,
    )
    return FinetuneConfig(**(base | kw))


def cls_config(data: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(
        datalist=str(data[0]),
        splits=str(data[1]),
        fraction=100,
        task="classification",
        network="ResNet",
        network_kwargs=CLS_NET,
        num_classes=2,
        roi_size=[28, 28, 28],
        normalisation="none",
        batch_size=4,
        max_epochs=2,
        lr=1e-3,
        device="cpu",
        deterministic=True,
        out_dir=str(out),
        experiment=None,
    )
    return FinetuneConfig(**(base | kw))


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_segmentation_run_logs_metrics_and_selects_on_validation(
    hippo, tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = seg_config(
        hippo, tmp_path / "seg", experiment="ft-seg", tracking_uri=mlflow_uri, study="hippo-test", fraction=50
    )
    res = run_finetune(cfg, progress=True)
    assert res.status == "finished" and res.epochs_run == 2 and res.transfer is None
    assert set(res.best_val) == SEG_METRICS and set(res.test_metrics) == SEG_METRICS
    assert 0.0 <= res.test_metrics["dice_mean"] <= 1.0 and res.best_epoch in (1, 2)
    best = load_checkpoint(res.best_checkpoint)
    assert best["epoch"] == res.best_epoch and best["val"] == res.best_val
    last = load_checkpoint(res.out_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 2  # 2 training cases (50 %), batch 2 → 1 step per epoch
    at_best = next(h for h in last["history"] if h["epoch"] == res.best_epoch)
    assert at_best["val_dice_mean"] == pytest.approx(res.best_val["dice_mean"])
    # the best weights rebuild from the checkpoint recipe alone
    net = rebuild_model(best["recipe"])
    net.load_state_dict(best["model"])
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    run = _client(mlflow_uri).get_run(res.run_id)
    names = set(run.data.metrics)
    assert {f"val_{m}" for m in SEG_METRICS} | {f"test_{m}" for m in SEG_METRICS} | {"train_loss"} <= names
    assert not names & {f"val_{m}" for m in CLS_METRICS}
    assert run.data.metrics["test_dice_mean"] == pytest.approx(res.test_metrics["dice_mean"])
    tags = run.data.tags
    assert (
        tags["medssl.kind"] == "finetune"
        and tags["medssl.fraction"] == "50"
        and tags["medssl.init"] == "scratch"
    )
    assert (
        tags["medssl.seed"] == "0" and tags["medssl.study"] == "hippo-test" and run.info.status == "FINISHED"
    )
    assert tags["medssl.machine"] == machine_tag() and machine_info()["cpu_capability"] in tags["medssl.machine"]
    assert load_checkpoint(res.best_checkpoint)["recipe"]["machine"] == machine_info()
    assert len(tags["medssl.data_hash"]) == 16
    assert res.timing["steps"] == 2 and float(tags["medssl.s_per_step"]) == pytest.approx(res.timing["s_per_step"],
                                                                                          abs=1e-4)
    assert float(tags["medssl.train_minutes"]) == pytest.approx(res.timing["train_s"] / 60, abs=0.01)
    assert run.data.params["normalisation"] == "robust" and run.data.params["network"] == "SegResNet"
    arts = {a.path for a in _client(mlflow_uri).list_artifacts(res.run_id)}
    assert {"config.yaml", "results.json", "checkpoints"} <= arts


def test_classification_run_logs_metrics(adrenal, tmp_path: Path, mlflow_uri: str) -> None:
    cfg = cls_config(adrenal, tmp_path / "cls", experiment="ft-cls", tracking_uri=mlflow_uri)
    res = run_finetune(cfg, progress=False)
    assert set(res.best_val) == CLS_METRICS and set(res.test_metrics) == CLS_METRICS
    assert 0.0 <= res.test_metrics["auc"] <= 1.0 and res.epochs_run == 2
    names = set(_client(mlflow_uri).get_run(res.run_id).data.metrics)
    assert {f"val_{m}" for m in CLS_METRICS} | {f"test_{m}" for m in CLS_METRICS} | {"train_loss"} <= names
    assert "val_dice_mean" not in names


def test_ssl_init_loads_fully_and_logs_the_report(ssl_run, hippo, tmp_path: Path, mlflow_uri: str) -> None:
    cfg = seg_config(
        hippo,
        tmp_path / "ssl",
        init=f"ssl:{ssl_run.encoder_path}",
        network_kwargs={},
        max_epochs=1,
        experiment="ft-ssl",
        tracking_uri=mlflow_uri,
        tags={"medssl.data_hash": "study-hash"},
    )
    res = run_finetune(cfg, progress=False)
    assert (
        res.transfer["share"] == 1.0 and res.transfer["n_missing"] == 0 and res.transfer["n_mismatched"] == 0
    )
    saved = json.loads((res.out_dir / "transfer_report.json").read_text())
    assert saved["n_matched"] == res.transfer["n_matched"] > 0
    resolved = FinetuneConfig.from_yaml(res.out_dir / "config.yaml")  # preprocessing taken from the recipe
    assert resolved.normalisation == "robust" and resolved.target_spacing == [1.0, 1.0, 1.0]
    run = _client(mlflow_uri).get_run(res.run_id)
    assert run.data.params["transfer.share"] == "1.0" and run.data.tags["medssl.init"] == "ssl"
    assert run.data.tags["medssl.data_hash"] == "study-hash"  # a sweep's own tag is kept
    assert "transfer_report.json" in {a.path for a in _client(mlflow_uri).list_artifacts(res.run_id)}


def test_ssl_checkpoint_that_does_not_fit_fails_with_report(
    ssl_run, hippo, adrenal, tmp_path: Path, mlflow_uri: str
) -> None:
    # a tampered encoder (one tensor of another shape): the report names it, the MLflow run is FAILED
    ckpt = torch.load(ssl_run.encoder_path, weights_only=True)
    ckpt["state_dict"]["net.convInit.conv.weight"] = torch.zeros(8, 1, 3, 3, 3)
    torch.save(ckpt, tmp_path / "bad.pt")
    cfg = seg_config(
        hippo,
        tmp_path / "bad",
        init=f"ssl:{tmp_path / 'bad.pt'}",
        network_kwargs={},
        experiment="ft-bad",
        tracking_uri=mlflow_uri,
    )
    with pytest.raises(TransferError, match="convInit.conv.weight") as err:
        run_finetune(cfg, progress=False)
    assert err.value.report.mismatched[0][0] == "convInit.conv.weight" and err.value.report.share < 1.0
    assert json.loads((tmp_path / "bad" / "transfer_report.json").read_text())["n_mismatched"] == 1
    client = _client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ft-bad").experiment_id])
    assert run.info.status == "FAILED" and "TransferError" in run.data.tags["medssl.error"]
    # a SegResNet encoder cannot initialise a ResNet classifier: nothing matches
    cfg = cls_config(
        adrenal,
        tmp_path / "family",
        init=f"ssl:{ssl_run.encoder_path}",
        network_kwargs={},
        normalisation=None,
        roi_size=[32, 32, 32],
    )
    with pytest.raises(TransferError, match="no encoder weight matched") as err:
        run_finetune(cfg, progress=False)
    assert any("not built for ResNet" in n for n in err.value.report.notes)


def test_preprocessing_conflict_refused_unless_overridden(ssl_run, hippo, tmp_path: Path) -> None:
    cfg = seg_config(
        hippo,
        tmp_path / "pre",
        init=f"ssl:{ssl_run.encoder_path}",
        network_kwargs={},
        normalisation="none",
        target_spacing=[2.0, 2.0, 2.0],
    )
    with pytest.raises(ConfigMismatchError, match="normalisation") as err:
        run_finetune(cfg, progress=False)
    assert set(err.value.fields) == {"normalisation", "target_spacing"}
    with pytest.raises(ConfigMismatchError, match="roi_size"):  # SegResNet with 2 levels: multiples of 2
        build_model(cfg.replace(normalisation=None, target_spacing=None, roi_size=[15, 16, 16]))
    _, recipe, report, pre = build_model(cfg.replace(override_preprocessing=True))
    assert (
        pre["normalisation"] == "none" and recipe["target_spacing"] == [2.0, 2.0, 2.0] and report.share == 1.0
    )


def test_early_stopping_and_test_on_best_checkpoint(adrenal, tmp_path: Path, monkeypatch) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])  # validation AUCs: best at epoch 2, then 2 without improvement
    real = Finetuner.evaluate

    def scripted(self: Finetuner, dataset) -> dict[str, float]:
        out = real(self, dataset)
        return out | {"auc": next(scores)} if dataset is self.val_ds else out

    monkeypatch.setattr(Finetuner, "evaluate", scripted)
    cfg = cls_config(adrenal, tmp_path / "es", fraction=25, max_epochs=5, early_stopping_patience=2)
    res = run_finetune(cfg, progress=False)
    assert res.status == "early_stopped" and res.epochs_run == 4 and res.best_epoch == 2
    assert res.best_val["auc"] == 0.7
    last = load_checkpoint(res.out_dir / "checkpoints" / "last.pt")
    assert last["stopped"] and last["epoch"] == 4 and load_checkpoint(res.best_checkpoint)["epoch"] == 2
    monkeypatch.setattr(Finetuner, "evaluate", real)
    ft = Finetuner(cfg)  # an independent evaluation of the epoch-2 weights on the test set
    # 4 class-0 and 2 class-1 training cases → inverse-frequency weights 6 / (2 · n_c)
    torch.testing.assert_close(ft.loss_fn.weight, torch.tensor([0.75, 1.5]))
    ft.model.load_state_dict(load_checkpoint(res.best_checkpoint)["model"])
    from medssl.engines.finetune.data import make_dataset

    assert ft.evaluate(make_dataset(ft.items["test"], ft.eval_tf)) == pytest.approx(
        res.test_metrics, nan_ok=True
    )


def test_resume_after_interruption_matches_straight_run(
    adrenal, tmp_path: Path, monkeypatch, mlflow_uri: str
) -> None:
    straight = run_finetune(
        cls_config(adrenal, tmp_path / "straight", fraction=25, max_epochs=3), progress=False
    )
    cfg = cls_config(
        adrenal,
        tmp_path / "resumed",
        fraction=25,
        max_epochs=3,
        experiment="ft-resume",
        tracking_uri=mlflow_uri,
    )
    last = crash_at_epoch(cfg, 2, monkeypatch)
    first_id = load_checkpoint(last)["mlflow_run_id"]
    assert load_checkpoint(last)["epoch"] == 2
    resumed = run_finetune(cfg, resume="auto", progress=False)
    assert resumed.epochs_run == 3 and resumed.run_id == first_id
    a = load_checkpoint(straight.out_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, nan_ok=True)
    assert resumed.best_val == pytest.approx(straight.best_val, nan_ok=True)
    client = _client(mlflow_uri)
    assert client.get_run(first_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first_id, "val_auc")] == [1, 2, 3]
    # a checkpoint of another fraction is refused
    with pytest.raises(ConfigMismatchError, match="fraction"):
        run_finetune(cfg.replace(fraction=100), resume=last, progress=False)
    # so is one whose augmentation or sampling of the cases differs (it would not continue the same run)
    with pytest.raises(ConfigMismatchError, match="augment"):
        run_finetune(cfg.replace(augment={"flip_axes": [0]}), resume=last, progress=False)
    with pytest.raises(ConfigMismatchError, match="batch_size"):
        run_finetune(cfg.replace(batch_size=cfg.batch_size + 1), resume=last, progress=False)


def test_fraction_without_a_class_is_named(adrenal, tmp_path: Path) -> None:
    datalist, splits_path = adrenal
    splits = json.loads(Path(splits_path).read_text())
    classes = {it["case_id"]: it["class"] for it in json.loads(datalist.read_text())["training"]}
    splits["seeds"]["0"]["fractions"]["25"] = [
        c for c in splits["seeds"]["0"]["fractions"]["25"] if classes[c] == 0
    ]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    cfg = cls_config((datalist, tmp_path / "splits.json"), tmp_path / "run", fraction=25)
    with pytest.raises(MedsslError, match=r"fraction 25 % leaves class\(es\) \[1\] without training cases"):
        run_finetune(cfg, progress=False)
    with pytest.raises(MedsslError, match=r"fraction 5 % is not in .* \(fractions: \['25', '100'\]\)"):
        run_finetune(cfg.replace(fraction=5), progress=False)


def test_freeze_llrd_and_encoder_warmup(adrenal, tmp_path: Path) -> None:
    from medssl.networks.downstream import is_encoder_key

    def params(ft: Finetuner) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in ft.model.named_parameters()}

    def changed(a: dict, b: dict) -> tuple[set[str], set[str]]:
        moved = {k for k in a if not torch.equal(a[k], b[k])}
        return {k for k in moved if is_encoder_key(k, "ResNet")}, {
            k for k in moved if not is_encoder_key(k, "ResNet")
        }

    base = cls_config(adrenal, tmp_path / "opt", fraction=25, batch_size=3)  # 6 cases: 2 steps per epoch
    ft = Finetuner(base.replace(freeze_encoder=True))
    before = params(ft)
    ft.train_epoch(0)
    enc, head = changed(before, params(ft))
    assert not enc and head == {"fc.weight", "fc.bias"}
    ft = Finetuner(base.replace(encoder_warmup_steps=2, max_epochs=2))
    before = params(ft)
    ft.train_epoch(0)  # steps 0 and 1: encoder lr 0
    mid = params(ft)
    enc, head = changed(before, mid)
    assert not enc and head == {"fc.weight", "fc.bias"}
    ft.train_epoch(1)
    enc, _ = changed(mid, params(ft))
    assert "conv1.weight" in enc
    ft = Finetuner(base.replace(llrd=0.5, max_steps=3))  # 2 steps per epoch: 3 steps end in epoch 2
    assert ft.total_steps == ft.schedule.total_steps == 3 and ft.max_epochs == 2
    ft.schedule.apply()
    lrs = {g["name"]: g["lr"] for g in ft.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(base.lr) and lrs["encoder.depth4"] == pytest.approx(base.lr / 2)
    assert lrs["encoder.depth0"] == pytest.approx(base.lr / 32)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hippocampus_from_scratch_reaches_reasonable_dice(hippocampus_dir: Path, tmp_path: Path) -> None:
    """All 200 cases (test 40, validation 20, training 140), small SegResNet from scratch, 100 % labels,
    1050 steps (GPU when present). Not a benchmark: checks that the engine actually learns the task."""
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))
    items = [
        {"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": p.name[:-7]}
        for p in images
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(tmp_path / "datalist.json", fractions=[100], seeds=[0], val_fraction=0.1)
    net = {"init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]}
    cfg = seg_config(
        (tmp_path / "datalist.json", splits),
        tmp_path / "run",
        network_kwargs=net,
        roi_size=[32, 32, 32],
        batch_size=4,
        num_samples=2,
        lr=3e-3,
        max_epochs=30,
        val_every=5,
        sw_overlap=0.25,
        deterministic=False,
        device="auto",
    )
    res = run_finetune(cfg, progress=False)
    assert res.test_metrics["dice_mean"] > 0.7, res.test_metrics


def test_weights_and_training_do_not_depend_on_the_callers_rng(hippo, tmp_path: Path) -> None:
    """Two runs of one config in one process (a sweep, a bundle, a test) train identical weights, whatever the
    global RNGs held before: the Finetuner seeds itself from ``config.seed``."""
    states = []
    for i, noise in enumerate((1, 12345)):
        torch.manual_seed(noise)
        np.random.seed(noise)
        ft = Finetuner(seg_config(hippo, tmp_path / f"run{i}", max_epochs=1, max_steps=2))
        init = {k: v.clone() for k, v in ft.model.state_dict().items()}
        ft.fit(progress=False)
        states.append((init, {k: v.clone() for k, v in ft.model.state_dict().items()}))
    for before, after in zip(states[0], states[1], strict=True):
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
    # and the run trained: the best weights differ from the initial ones
    assert any(not torch.equal(states[0][0][k], states[0][1][k]) for k in states[0][0])
