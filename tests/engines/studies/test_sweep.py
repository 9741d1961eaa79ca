"""Sweeps against a real MLflow sqlite store, with a fast fake finetune that logs through the real tracker."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from medssl.data.splits import split_datalist
from medssl.engines.studies.pipeline import finetune_dict, load_pipeline
from medssl.engines.studies.sweep import run_sweep
from medssl.errors import MedsslError
from medssl.tracking.compare import DIFF, find_study_runs
from medssl.tracking.mlflow_tracker import MlflowTracker, make_client
from tests.engines.studies._helpers import SEG_NET, children, fresh_sqlite_uri, hippocampus_datalist


def make_data(folder: Path, n: int = 20, classes: bool = False) -> tuple[Path, Path]:
    """A datalist of ``n`` labelled fake cases (files are never read by the fakes) and its splits."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        it: dict[str, Any] = {"image": f"img{i}.nii.gz", "case_id": f"case{i:03d}"}
        if classes:
            it["class"] = int(i % 4 == 0)
        else:
            it["label"] = f"lbl{i}.nii.gz"
        items.append(it)
    dl = folder / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, _ = split_datalist(dl, fractions=[10, 50, 100], seeds=[0, 1, 2])
    return dl, path


def fake_value(fraction: float, init: str, seed: int) -> float:
    """Deterministic fake test Dice: grows with the fraction, SSL is better, seeds jitter."""
    return round(0.5 + 0.003 * fraction + (0.05 if init == "ssl" else 0.0) + 0.01 * seed, 6)


class FakeFinetune:
    """Stands in for ``run_finetune``: a real child MLflow run, 3 epochs of val metrics, test metrics.

    ``fail``: sweep keys that raise. ``interrupt``: keys that raise KeyboardInterrupt after epoch 1 (once).
    Resume: ``out_dir/state.json`` holds the run id and the last epoch, like a checkpoint would.
    """

    def __init__(
        self, fail: set[str] | None = None, interrupt: set[str] | None = None, **tracker_kw: Any
    ) -> None:
        self.fail, self.interrupt = set(fail or ()), set(interrupt or ())
        self.calls: list[tuple[str, str | None]] = []
        self.configs: list[Any] = []
        self.tracker_kw = tracker_kw
        self.on_epoch: Any = None  # hook(key, epoch) for outage tests
        self.bonus: Any = None  # fn(cfg) -> float added to the fake value (e.g. self-training students)

    def __call__(self, cfg: Any, *, resume: str | None, progress: bool) -> SimpleNamespace:
        key = cfg.tags["medssl.sweep_key"]
        self.calls.append((key, resume))
        self.configs.append(cfg)
        if key in self.fail:
            raise RuntimeError(f"boom in {key}")
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state_file = out / "state.json"
        state = json.loads(state_file.read_text()) if resume == "auto" and state_file.exists() else {}
        tr = MlflowTracker(
            cfg.experiment,
            run_name=cfg.run_name,
            tracking_uri=cfg.tracking_uri,
            tags=cfg.tags,
            parent_run_id=cfg.parent_run_id,
            run_id=state.get("run_id"),
            spool_path=out / "mlflow_spool.jsonl",
            **self.tracker_kw,
        )
        if not state:
            tr.log_params({"fraction": cfg.fraction, "seed": cfg.seed, "init": cfg.init})
        value = fake_value(cfg.fraction, cfg.init_kind, cfg.seed) + (self.bonus(cfg) if self.bonus else 0.0)
        for epoch in range(state.get("epoch", 0), 3):
            tr.log_metrics(
                {"val_dice_mean": value - 0.01 * (2 - epoch), "train_loss": 1.0 / (epoch + 1)}, epoch
            )
            state_file.write_text(json.dumps({"run_id": tr.run_id, "epoch": epoch + 1}))
            if self.on_epoch:
                self.on_epoch(key, epoch)
            if key in self.interrupt and epoch == 0:
                self.interrupt.discard(key)
                tr.close("KILLED")
                raise KeyboardInterrupt
        test = {"test_dice_mean": value, "test_dice_1": value - 0.01, "test_dice_2": value + 0.01}
        tr.log_metrics(test, 3)
        tr.close("FINISHED")
        return SimpleNamespace(run_id=tr.run_id, test_metrics=test, status="FINISHED")


def write_encoder(out: Path, width: int = 4, **recipe: Any) -> Path:
    """A real (tiny, untrained) SegResNet ``encoder.pt`` whose recipe records ``recipe``'s preprocessing."""
    from medssl.engines.runtime.checkpoint import save_encoder
    from medssl.networks.encoders import build_encoder

    enc = build_encoder("segresnet", in_channels=1, img_size=(16, 16, 16), init_filters=width,
                        blocks_down=[1, 1], blocks_up=[1], norm=["GROUP", {"num_groups": 2}])
    base = dict(encoder=enc.recipe, method="simclr", method_kwargs={}, in_channels=1, roi_size=[16, 16, 16],
                target_spacing=[1.0, 1.0, 1.0], normalisation="robust", ct_window=[-1000.0, 1000.0])
    pt, _ = save_encoder(out, enc, base | recipe)
    return pt


class FakePretrain:
    """Stands in for ``run_pretraining``: writes a real tiny ``encoder.pt`` (recipe: ``recipe``, weights from
    ``width``) and a real child run."""

    def __init__(self, width: int = 4, **recipe: Any) -> None:
        self.calls, self.width, self.recipe = 0, width, recipe

    def __call__(self, cfg: Any, *, resume: Any, progress: bool) -> SimpleNamespace:
        self.calls += 1
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_encoder(out, self.width, **self.recipe)
        tr = MlflowTracker(
            cfg.experiment,
            run_name=cfg.run_name,
            tracking_uri=cfg.tracking_uri,
            tags={**cfg.tags, "medssl.kind": "pretrain"},
            parent_run_id=cfg.parent_run_id,
            spool_path=out / "spool.jsonl",
        )
        tr.log_metrics({"loss": 1.0}, 1)
        tr.close()
        return SimpleNamespace(encoder_path=out / "encoder.pt", run_id=tr.run_id)


def pipeline(tmp: Path, uri: str | None, study: str = "toy", **kw: Any) -> dict[str, Any]:
    dl, sp = make_data(tmp / "data")
    return {
        "study": study,
        "experiment": "sweep-tests",
        "tracking_uri": uri,
        "out_dir": str(tmp / "runs"),
        "data": {"datalist": str(dl), "splits": str(sp)},
        "pretrain": {"method": "simclr", "total_steps": 2},
        "finetune": {"task": "segmentation", "network": "SegResNet", "max_epochs": 3},
        "fractions": [10, 100],
        "inits": ["scratch", "ssl"],
        "seeds": [0, 1],
        "metric": "test_dice_mean",
        **kw,
    }


def test_sweep_parent_children_tags_failure_and_rerun(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    ft, pre = FakeFinetune(fail={"f10-ssl-s1"}), FakePretrain()
    spec = pipeline(
        tmp_path, uri, finetune_by_init={"ssl": {"lr": 0.5}}, finetune_by_fraction={10: {"lr": 0.2}}
    )
    res = run_sweep(spec, finetune_fn=ft, pretrain_fn=pre)
    assert pre.calls == 1 and len(ft.calls) == 8 and all(r == "auto" for _, r in ft.calls)
    assert [c.key for c in res.failed] == ["f10-ssl-s1"] and "boom in f10-ssl-s1" in res.failed[0].error
    client = make_client(uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["medssl.study"] == "toy" and parent.data.tags["medssl.kind"] == "sweep"
    assert parent.info.status == "FINISHED" and parent.data.tags["medssl.children_failed"] == "1"
    assert len(parent.data.tags["medssl.data_hash"]) == 16
    runs = children(uri, res.parent_run_id)
    by_key = {r.data.tags["medssl.sweep_key"]: r for r in runs}
    assert set(by_key) == {
        f"f{f}-{i}-s{s}" for f in (10, 100) for i in ("scratch", "ssl") for s in (0, 1)
    } | {"pretrain"}
    run = by_key["f100-ssl-s0"]
    assert run.info.status == "FINISHED"
    assert {
        k: run.data.tags[k] for k in ("medssl.study", "medssl.fraction", "medssl.init", "medssl.seed")
    } == {"medssl.study": "toy", "medssl.fraction": "100", "medssl.init": "ssl", "medssl.seed": "0"}
    assert len(run.data.tags["medssl.data_hash"]) == 16 and len(run.data.tags["medssl.config_hash"]) == 16
    assert run.data.metrics["test_dice_mean"] == pytest.approx(fake_value(100, "ssl", 0))
    failed = by_key["f10-ssl-s1"]
    assert failed.info.status == "FAILED" and "boom" in failed.data.tags["medssl.error"]
    assert "boom" in failed.data.params["medssl.error"]
    # every child got its own deterministic folder under the study; ssl children the pretrained encoder
    cfgs = {c.tags["medssl.sweep_key"]: c for c in ft.configs}
    assert Path(cfgs["f10-scratch-s0"].out_dir) == res.sweep_dir / "f10-scratch-s0"
    assert res.sweep_dir == tmp_path / "runs" / "toy" / "sweep"
    assert parent.data.tags["medssl.sweep_dir"] == str(res.sweep_dir.resolve())
    assert cfgs["f10-ssl-s0"].init == f"ssl:{(res.sweep_dir / 'pretrain' / 'encoder.pt').resolve()}"
    assert cfgs["f10-scratch-s0"].init == "scratch" and cfgs["f10-scratch-s0"].study == "toy"
    lrs = {k: c.lr for k, c in cfgs.items()}  # by_init wins over by_fraction wins over the base
    assert lrs["f10-scratch-s0"] == 0.2 and lrs["f10-ssl-s0"] == 0.5 and lrs["f100-scratch-s1"] == 1e-3
    assert json.loads((res.sweep_dir / "sweep.json").read_text())["parent_run_id"] == res.parent_run_id
    text = io.StringIO()
    Console(file=text, width=200).print(res.table("test_dice_mean"))
    assert "f10-ssl-s1" in text.getvalue() and "FAILED" in text.getvalue() and "boom" in text.getvalue()
    assert f"test_dice_mean={fake_value(100, 'ssl', 0):.4f}" in text.getvalue()

    # re-run: same parent, finished children and pretraining skipped, the failed child retried
    ft2 = FakeFinetune()
    res2 = run_sweep(spec, finetune_fn=ft2, pretrain_fn=pre)
    assert res2.parent_run_id == res.parent_run_id and pre.calls == 1
    assert [k for k, _ in ft2.calls] == ["f10-ssl-s1"] and not res2.failed
    assert sum(c.status == "SKIPPED" for c in res2.children) == 7
    assert len(find_study_runs(client, "toy")) == 1


def test_interrupted_child_resumes_and_new_parent(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="interrupt", fractions=[100], inits=["scratch"], seeds=[0, 1])
    ft = FakeFinetune(interrupt={"f100-scratch-s1"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, finetune_fn=ft)
    client = make_client(uri)
    (parent,) = find_study_runs(client, "interrupt")
    assert parent.info.status == "KILLED"
    first_run = json.loads((tmp_path / "runs/interrupt/sweep/f100-scratch-s1/state.json").read_text())[
        "run_id"
    ]
    res = run_sweep(spec, finetune_fn=ft)
    assert res.parent_run_id == parent.info.run_id and not res.failed
    assert [k for k, _ in ft.calls] == ["f100-scratch-s0", "f100-scratch-s1", "f100-scratch-s1"]
    resumed = client.get_run(first_run)  # the same MLflow run was continued, no metric lost or doubled
    assert resumed.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first_run, "val_dice_mean")) == [0, 1, 2]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # new=True: a second parent with its own folder, every child run again
    ft_new = FakeFinetune()
    res_new = run_sweep(spec, new=True, finetune_fn=ft_new)
    assert res_new.parent_run_id != parent.info.run_id and len(ft_new.calls) == 2
    assert res_new.sweep_dir.name == f"sweep-{res_new.parent_run_id[:8]}"
    assert [r.info.run_id for r in find_study_runs(client, "interrupt")][0] == res_new.parent_run_id


def test_default_sqlite_store_in_working_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    fresh_sqlite_uri(tmp_path)  # ./mlruns.db, pre-initialised only to save time
    spec = pipeline(tmp_path, None, study="default-store", fractions=[50], inits=["scratch"], seeds=[0])
    res = run_sweep(spec, finetune_fn=FakeFinetune())
    assert not res.failed
    runs = children(f"sqlite:///{tmp_path / 'mlruns.db'}", res.parent_run_id)
    assert [r.data.tags["medssl.sweep_key"] for r in runs] == ["f50-scratch-s0"]


def test_reused_checkpoint_and_pretraining_failure(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    enc = write_encoder(tmp_path / "enc")
    ft = FakeFinetune()
    spec = pipeline(
        tmp_path, uri, study="reuse", pretrain={"checkpoint": str(enc)}, fractions=[100], seeds=[0]
    )
    res = run_sweep(spec, finetune_fn=ft, pretrain_fn=lambda *a, **k: pytest.fail("must not pretrain"))
    assert res.encoder_path == enc.resolve() and ft.configs[-1].init == f"ssl:{enc.resolve()}"

    def broken(cfg: Any, **_: Any) -> None:
        raise MedsslError("no volumes")

    spec = pipeline(tmp_path, uri, study="nopre", fractions=[100], seeds=[0])
    res = run_sweep(spec, finetune_fn=FakeFinetune(), pretrain_fn=broken)
    assert [c.key for c in res.failed] == ["f100-ssl-s0"] and "pretraining failed" in res.failed[0].error
    assert [c.status for c in res.children if c.init == "scratch"] == ["FINISHED"]


def test_bad_pipelines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medssl.engines.studies.pipeline import check_fractions_available

    base = pipeline(tmp_path, "sqlite:///unused.db")
    sp_path = Path(base["data"]["splits"])
    with pytest.raises(MedsslError, match=r"fraction 25 % is not in"):
        check_fractions_available(sp_path, [25], [0])
    with pytest.raises(MedsslError, match="seed 7 is not in"):
        check_fractions_available(sp_path, [10], [7])
    # the sweep adds a missing seed/fraction to splits.json (extend_splits) unless that would change the existing
    # sets: a hand-edited file is refused with the file named, before any run exists, and left as it is
    edited = json.loads(sp_path.read_text())
    edited["test"] = edited["test"][:-1]
    sp_path.write_text(json.dumps(edited))
    with pytest.raises(MedsslError, match=r"splits\.json: cannot add seeds \[7\].*changes the test set"):
        run_sweep({**base, "seeds": [7]}, finetune_fn=FakeFinetune())
    assert json.loads(sp_path.read_text()) == edited and not (tmp_path / "runs").exists()
    with pytest.raises(MedsslError, match=r"unknown pipeline key\(s\) \['fractons'\]"):
        load_pipeline({**base, "fractons": [1]})
    with pytest.raises(MedsslError, match="needs a 'pretrain' section"):
        load_pipeline({**base, "pretrain": None})
    with pytest.raises(MedsslError, match="inits must be"):
        load_pipeline({**base, "inits": ["imagenet"]})
    pl = load_pipeline(base, ["seeds=[3]", "finetune.max_steps=7", "finetune_by_fraction.10.val_every=2"])
    assert pl.seeds == [3] and pl.finetune["max_steps"] == 7 and base["finetune"].get("max_steps") is None
    assert pl.finetune_by_fraction == {"10": {"val_every": 2}}
    with caplog.at_level(logging.WARNING, logger="medssl"):
        load_pipeline(base, {"finetune_by_fraction": {42: {"val_every": 1}}})
    assert "finetune_by_fraction names fractions [42.0] not swept" in caplog.text
    with pytest.raises(MedsslError, match="NOT_SET_ANYWHERE"):
        load_pipeline({**base, "data": {"sources": ["${NOT_SET_ANYWHERE}/x"]}})
    with pytest.raises(MedsslError, match="pretrain.checkpoint .*missing.pt does not exist"):
        run_sweep(
            {**base, "pretrain": {"checkpoint": str(tmp_path / "missing.pt")}}, finetune_fn=FakeFinetune()
        )
    with pytest.raises(MedsslError, match="invalid FinetuneConfig"):
        run_sweep(
            {**base, "finetune": {"task": "segmentation", "network": "ResNet"}}, finetune_fn=FakeFinetune()
        )


def test_unreachable_tracking_server_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(MedsslError, match=f"MLflow at http://127.0.0.1:{port}"):
        run_sweep(pipeline(tmp_path, f"http://127.0.0.1:{port}"), finetune_fn=FakeFinetune())


def test_fraction_leaving_a_class_empty_is_refused(tmp_path: Path) -> None:
    dl, sp = make_data(tmp_path / "cls", classes=True)
    splits = json.loads(sp.read_text())
    splits["counts"]["seeds"]["0"]["classes"]["10"].pop("1")  # as a split without per-class minimum would
    sp.write_text(json.dumps(splits))
    spec = pipeline(tmp_path, "sqlite:///unused.db", data={"datalist": str(dl), "splits": str(sp)}, seeds=[0])
    with pytest.raises(
        MedsslError, match=r"fraction 10 % \(seed 0\) leaves class\(es\) \['1'\] without cases"
    ):
        run_sweep(spec, finetune_fn=FakeFinetune())


def test_pipeline_files_parse() -> None:
    root = Path(__file__).resolve().parents[3] / "pipelines"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == ["classification_adrenal.yaml", "classification_adrenal_whole.yaml", "label_efficiency.yaml", "label_efficiency_genesis.yaml",
                     "label_efficiency_gpu.yaml", "label_efficiency_spark.yaml", "label_efficiency_spark_unet.yaml",
                     "recipe_check.yaml"]
    for name in names:
        if name == "recipe_check.yaml":  # scratch only, no pretraining: tests/engines/finetune/test_planner.py
            continue
        pl = load_pipeline_env(root / name)  # the GPU suite's file runs one seed (tests/test_gpu_suite.py)
        assert pl.inits == ["scratch", "ssl"] and len(pl.seeds) >= (1 if name.endswith("_gpu.yaml") else 2)
        from medssl.config import PretrainConfig
        from medssl.engines.finetune.config import FinetuneConfig

        for f in pl.fractions:
            for init in pl.inits:
                FinetuneConfig.from_dict({**finetune_dict(pl, f, init), "fraction": f})
        PretrainConfig.from_dict(pl.pretrain)
    assert load_pipeline_env(root / "label_efficiency.yaml").fractions == [5, 10, 25, 50, 100]
    assert load_pipeline_env(root / "classification_adrenal.yaml").fractions == [1, 10, 100]
    # recipe 3 differs from recipe 2 in the pretext's views only (finetuning, data, seeds identical)
    r2, r3 = (load_pipeline_env(root / n) for n in ("classification_adrenal.yaml", "classification_adrenal_whole.yaml"))
    assert (r3.finetune, r3.data, r3.fractions, r3.seeds) == (r2.finetune, r2.data, r2.fractions, r2.seeds)
    assert r3.pretrain["roi_size"] == [28, 28, 28] and r3.pretrain["augment_kwargs"]["scale"] == [1.0, 1.0]
    assert r3.study != r2.study
    genesis = load_pipeline_env(root / "label_efficiency_genesis.yaml")
    assert genesis.pretrain["method"] == "genesis" and genesis.finetune["network"] == "BasicUNet"
    # reuses label_efficiency.yaml's data, so both studies share one fixed test set and fraction subsets
    simclr = load_pipeline_env(root / "label_efficiency.yaml")
    assert Path(genesis.data["datalist"]).parent == Path(simclr.out_dir) / simclr.study / "data"
    # issue 12's study: SparK U-Net → SegResNet on the same data, the pretrained-weights schedule on
    spark = load_pipeline_env(root / "label_efficiency_spark.yaml")
    assert spark.data == genesis.data and spark.seeds == [0, 1, 2] and {5, 10, 100} <= set(spark.fractions)
    assert spark.pretrain["method"] == "spark" and spark.pretrain["encoder"] == "segresnet_unet"
    assert spark.finetune["ssl_schedule"] == "auto" and spark.finetune["augment"]["flip_axes"] == [0]
    assert spark.finetune["network_kwargs"] == spark.pretrain["encoder_kwargs"]


def load_pipeline_env(path: Path) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSSL_DATASETS", "/nonexistent")
        return load_pipeline(path)


@pytest.mark.timeout(300)
def test_real_engines_tiny_hippocampus_sweep(hippocampus_dir: Path, tmp_path: Path) -> None:
    """Real pretraining (2 SimCLR steps) + real finetuning (1 epoch), scratch and SSL, 6 hippocampus cases."""
    from medssl.tracking.compare import compare_study

    datalist = hippocampus_datalist(hippocampus_dir, tmp_path / "data")
    uri = fresh_sqlite_uri(tmp_path)
    spec = {
        "study": "hippo-tiny",
        "experiment": "sweep-real",
        "tracking_uri": uri,
        "out_dir": str(tmp_path / "runs"),
        "data": {
            "datalist": str(datalist),
            "test_fraction": 0.2,
            "val_fraction": 0.2,
        },
        "pretrain": {
            "method": "simclr",
            "encoder": "segresnet",
            "encoder_kwargs": SEG_NET,
            "roi_size": [16] * 3,
            "method_kwargs": {"hidden_dim": 8, "out_dim": 4},
            "total_steps": 2,
            "batch_size": 2,
            "target_spacing": [1.0, 1.0, 1.0],
            "device": "cpu",
            "preview": False,
        },
        "finetune": {
            "network": "SegResNet",
            "network_kwargs": SEG_NET,
            "roi_size": [16] * 3,
            "max_epochs": 1,
            "batch_size": 2,
            "sw_overlap": 0.0,
            "sw_batch_size": 8,
            "device": "cpu",
        },
        "fractions": [100],
        "inits": ["scratch", "ssl"],
        "seeds": [0],
        "metric": "test_dice_mean",
    }
    res = run_sweep(spec)
    assert not res.failed, [c.error for c in res.failed]
    assert res.encoder_path is not None and res.encoder_path.name == "encoder.pt"
    client = make_client(uri)
    runs = children(uri, res.parent_run_id)
    kinds = sorted(r.data.tags["medssl.kind"] for r in runs)
    assert kinds == ["finetune"] * 2 + ["pretrain"] and all(r.info.status == "FINISHED" for r in runs)
    ssl_run = next(r for r in runs if r.data.tags.get("medssl.sweep_key") == "f100-ssl-s0")
    assert ssl_run.data.params["config_hash"] == ssl_run.data.tags["medssl.config_hash"]
    assert ssl_run.data.tags["medssl.fraction"] == "100" and ssl_run.data.params["transfer.share"] == "1.0"
    out = compare_study("hippo-tiny", tracking_uri=uri)
    assert {(r["fraction"], r["init"]) for r in out.rows} == {
        (100.0, "scratch"),
        (100.0, "ssl"),
        (100.0, DIFF),
    }
    assert all(0.0 <= r["value"] <= 1.0 for r in out.records)
    assert {a.path for a in client.list_artifacts(res.parent_run_id, "compare")} == {
        f"compare/{out.csv_path.name}",
        f"compare/{out.png_path.name}",
    }
    again = run_sweep(spec)  # everything finished: nothing runs again
    assert {c.status for c in again.children} == {"SKIPPED"} and again.parent_run_id == res.parent_run_id


def test_finished_child_is_known_from_mlflow_or_from_its_marker(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="markers", fractions=[100], inits=["scratch"], seeds=[0, 1])
    res = run_sweep(spec, finetune_fn=FakeFinetune())
    s0, s1 = res.children
    client = make_client(uri)
    client.update_run(s0.run_id, status="RUNNING")  # its end status still spooled somewhere: marker says done
    (s1.out_dir / "sweep_child.json").unlink()  # marker lost: MLflow says FINISHED
    ft = FakeFinetune()
    again = run_sweep(spec, finetune_fn=ft)
    assert ft.calls == [] and [c.status for c in again.children] == ["SKIPPED", "SKIPPED"]
    assert again.children[0].run_id == s0.run_id and again.children[1].run_id == s1.run_id


def test_prepare_data_adds_new_seeds_to_existing_splits(tmp_path: Path) -> None:
    """`--set seeds=[0,1,2]` on a finished 2-seed study: seed 2 is added, the test set and seeds 0/1 stay."""
    from medssl.data.splits import load_splits, split_datalist
    from medssl.engines.studies.pipeline import check_fractions_available, prepare_data

    items = [{"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"c{i:03d}"} for i in range(30)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[10, 100], seeds=[0, 1])
    got = prepare_data({"datalist": str(dl)}, tmp_path, fractions=[10, 100], seeds=[0, 1, 2])
    new = load_splits(path)
    assert got == (dl.resolve(), path.resolve()) and sorted(new["seeds"]) == ["0", "1", "2"]
    assert new["test"] == old["test"] and all(new["seeds"][s] == old["seeds"][s] for s in ("0", "1"))
    check_fractions_available(path, [10, 100], [0, 1, 2])


def _hashes(uri: str, parent_id: str) -> dict[str, tuple[str, str]]:
    return {
        r.data.tags["medssl.sweep_key"]: (r.data.tags.get("medssl.config_hash"), r.data.tags.get("medssl.data_hash"))
        for r in children(uri, parent_id)
        if r.data.tags.get("medssl.sweep_key") != "pretrain"
    }


def test_changed_config_refuses_to_reuse_children(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="hashes", fractions=[10, 100], inits=["scratch"], seeds=[0])
    res = run_sweep(spec, finetune_fn=FakeFinetune())
    first = _hashes(uri, res.parent_run_id)
    assert len(set(h for h, _ in first.values())) == 1  # one config across fractions (no per-fraction override)
    assert len(set(d for _, d in first.values())) == 2  # each child's own training set
    marker = json.loads((res.sweep_dir / "f10-scratch-s0" / "sweep_child.json").read_text())
    assert marker["config_hash"] == first["f10-scratch-s0"][0] and marker["config"]["lr"] == 1e-3
    for change, named in (
        ("finetune.lr=0.01", r"lr: 0\.001 → 0\.01"),
        ("finetune.augment.flip_axes=[0]", r"augment\.flip_axes: \[0, 1, 2\] → \[0\]"),
    ):
        ft = FakeFinetune()
        with pytest.raises(MedsslError, match=rf"finished run f10-scratch-s0 .*{named}.*--new"):
            run_sweep(load_pipeline(spec, [change]), finetune_fn=ft)
        assert ft.calls == []
    # the same config written differently (defaults spelled out, 1e-3 as 0.001) is the same config
    same = FakeFinetune()
    run_sweep(load_pipeline(spec, ["finetune.lr=0.001", "finetune.augment.flip_prob=0.5"]), finetune_fn=same)
    assert same.calls == []
    # adding a seed later: only the new children run, with the same config hash
    more = FakeFinetune()
    again = run_sweep(load_pipeline(spec, ["seeds=[0,1]"]), finetune_fn=more)
    assert sorted(k for k, _ in more.calls) == ["f10-scratch-s1", "f100-scratch-s1"]
    hashes = _hashes(uri, again.parent_run_id)
    assert {h for h, _ in hashes.values()} == {first["f10-scratch-s0"][0]} and hashes["f10-scratch-s0"] == first[
        "f10-scratch-s0"
    ]
    # --new: a new parent run with the new config
    new = FakeFinetune()
    res_new = run_sweep(load_pipeline(spec, ["finetune.lr=0.01"]), new=True, finetune_fn=new)
    assert len(new.calls) == 2 and res_new.parent_run_id != res.parent_run_id
    # the datalist changed (same case ids, other content): refused naming the data hash
    dl = Path(spec["data"]["datalist"])
    data = json.loads(dl.read_text())
    data["training"][0]["image"] = "other.nii.gz"
    dl.write_text(json.dumps(data))
    with pytest.raises(MedsslError, match=r"finished run .* another data: data hash .*--new"):
        run_sweep(load_pipeline(spec, ["finetune.lr=0.01"]), finetune_fn=FakeFinetune())  # the newest parent


def test_interrupted_child_with_another_config_is_not_resumed(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="int-hash", fractions=[100], inits=["scratch"], seeds=[0])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, finetune_fn=FakeFinetune(interrupt={"f100-scratch-s0"}))
    with pytest.raises(MedsslError, match=r"interrupted run f100-scratch-s0 .*max_epochs: 3 → 5"):
        run_sweep(load_pipeline(spec, ["finetune.max_epochs=5"]), finetune_fn=FakeFinetune())
    ft = FakeFinetune()
    assert not run_sweep(spec, finetune_fn=ft).failed and ft.calls == [("f100-scratch-s0", "auto")]


def test_changed_pretraining_or_encoder_is_refused(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="pre-hash", fractions=[100], seeds=[0])
    res = run_sweep(spec, finetune_fn=FakeFinetune(), pretrain_fn=FakePretrain())
    with pytest.raises(MedsslError, match=r"finished run pretrain .*total_steps: 2 → 5.*--new"):
        run_sweep(load_pipeline(spec, ["pretrain.total_steps=5"]), finetune_fn=FakeFinetune())
    write_encoder(res.sweep_dir / "pretrain")  # re-pretrained in place: other weights, same recipe
    ft = FakeFinetune()
    with pytest.raises(MedsslError, match=r"finished run f100-ssl-s0 .*encoder_sha256"):
        run_sweep(spec, finetune_fn=ft, pretrain_fn=FakePretrain())
    assert ft.calls == []


def test_both_arms_get_the_ssl_recipes_preprocessing(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from medssl.engines.finetune.build import build_model
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.data import eval_transforms

    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="pre-arms", fractions=[100], seeds=[0],
                    finetune={"task": "segmentation", "network": "SegResNet", "max_epochs": 1,
                              "roi_size": [16, 16, 16]})
    ft = FakeFinetune()
    run_sweep(spec, finetune_fn=ft, pretrain_fn=FakePretrain(target_spacing=[1.5, 1.5, 2.0], normalisation="none"))
    cfgs = {c.init_kind: c for c in ft.configs}
    fields = ("target_spacing", "normalisation", "ct_window", "in_channels")
    assert [getattr(cfgs["scratch"], f) for f in fields] == [getattr(cfgs["ssl"], f) for f in fields]
    assert cfgs["scratch"].target_spacing == [1.5, 1.5, 2.0] and cfgs["scratch"].normalisation == "none"
    # what each arm's model build resolves (SSL: recipe + config) is identical, so are the tensors
    pres = {k: build_model(FinetuneConfig.from_dict(c.to_dict()))[3] for k, c in cfgs.items()}
    assert all(pres["scratch"][f] == pres["ssl"][f] for f in ("target_spacing", "normalisation", "ct_window"))
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((9, 8, 6)).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0])),
             tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image((rng.random((9, 8, 6)) > 0.5).astype(np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])),
             tmp_path / "lab.nii.gz")
    item = {"image": str(tmp_path / "case.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    out = {
        k: eval_transforms("segmentation", **{f: p[f] for f in ("target_spacing", "normalisation", "ct_window")})(
            dict(item)
        )["image"]
        for k, p in pres.items()
    }
    assert out["scratch"].shape == out["ssl"].shape and torch_equal(out["scratch"], out["ssl"])
    assert out["ssl"].pixdim.tolist() == [1.5, 1.5, 2.0]  # the recipe's spacing (native: 1 × 1 × 3 mm)


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
