"""bundles/ssl_pretrain: every part a `_target_`; with the default parts `python -m monai.bundle run` equals
`medssl pretrain` step for step (losses, recipe, MLflow experiment and tags), its encoder finetunes through
`init: ssl:` and `medssl compare` sees that run; overrides of the method and the optimizer take effect in the run;
resume through the bundle is exact; `medssl bundle run` takes `--set a.b=1` and `-- --a#b 1` alike and turns bad
overrides / targets into one line naming the key and the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medssl.bundles.run import bundle_overrides, resolve_bundle, run_bundle_config
from medssl.errors import MedsslError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "ssl_pretrain" / "configs"
TRAIN = CONFIGS / "train.yaml"
#: a tiny run, as a user types it on the bundle command line (and the same run as a PretrainConfig)
TINY = {"total_steps": 3, "batch_size": 2, "roi_size": [16, 16, 16], "network_def#init_filters": 8, "lr": 1e-3,
        "warmup_steps": 0, "device": "cpu", "checkpoint_every": 1}
CLI_TINY = {"method": "simclr", "encoder": "segresnet", "encoder_kwargs": {"init_filters": 8}, "in_channels": 1,
            "roi_size": [16, 16, 16], "batch_size": 2, "total_steps": 3, "lr": 1e-3, "min_lr": 1e-6,
            "weight_decay": 0.05, "warmup_steps": 0, "device": "cpu", "checkpoint_every": 1, "preview": True}


@pytest.fixture(scope="module")
def pool(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datalist of 4 real hippocampus MRI volumes (none of the finetuning cases) in the unlabeled section."""
    tmp = tmp_path_factory.mktemp("pool")
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[6:10]  # outside the finetuning cases
    (tmp / "datalist.json").write_text(json.dumps({"unlabeled": [
        {"image": str(p), "case_id": p.name[: -len(".nii.gz")]} for p in images]}))
    return tmp / "datalist.json"


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_bundle_equals_cli_mlflow_and_finetunes_through_ssl_init(pool: Path, hippocampus_dir: Path,
                                                                 tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.engine import run_pretraining
    from medssl.tracking.compare import compare_study
    from tests.deploy._finetuned import finetune_seg

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN), "--meta_file",
           str(CONFIGS / "metadata.json"), "--datalist", str(pool), "--output_dir", str(out), "--tracking_uri", uri,
           "--study", "bstudy"]
    for k, v in TINY.items():
        cmd += [f"--{k}", json.dumps(v)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cfg = PretrainConfig(datalist=str(pool), out_dir=str(tmp_path / "cli"), tracking_uri=uri, **CLI_TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bundle's subprocess (OMP_NUM_THREADS=1): 2 threads sum in another order
    try:
        cli = run_pretraining(cfg, progress=False, preemption=False)
    finally:
        torch.set_num_threads(threads)
    # the same components: equal losses (CLI path unchanged by the injection) and the same checkpoint recipe
    assert len(cli.loss_history) == 3 and _losses(out) == [(s, pytest.approx(v, abs=0)) for s, v in cli.loss_history]
    bundle_enc = torch.load(out / "encoder.pt", map_location="cpu", weights_only=False)
    cli_enc = torch.load(cli.encoder_path, map_location="cpu", weights_only=False)
    assert bundle_enc["recipe"] == cli_enc["recipe"]
    # the same MLflow experiment and tags (+ study and source)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("medssl-pretrain").experiment_id])
    by_source = {r.data.tags.get("medssl.source", "cli"): r for r in runs}
    assert set(by_source) == {"bundle", "cli"}
    b, c = by_source["bundle"].data.tags, by_source["cli"].data.tags
    assert set(c) - {"mlflow.runName"} <= set(b)
    assert (b["medssl.kind"], b["medssl.method"], b["medssl.encoder"]) == ("pretrain", "simclr", "segresnet")
    assert b["medssl.study"] == "bstudy" and b["medssl.data_hash"] == c["medssl.data_hash"]
    assert by_source["bundle"].info.status == "FINISHED"
    # the bundle's encoder finetunes through `init: ssl:` (transfer report) and compare sees the run
    exp = client.create_experiment("medssl-finetune", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"medssl.kind": "sweep", "medssl.study": "bstudy"}).info.run_id
    ft, ft_out = finetune_seg(hippocampus_dir, tmp_path / "ft", init=f"ssl:{out / 'encoder.pt'}", network_kwargs={},
                              experiment="medssl-finetune", tracking_uri=uri, study="bstudy", parent_run_id=parent)
    report = json.loads((ft_out / "transfer_report.json").read_text())
    assert report["share"] == 1.0 and report["matched"]
    res = compare_study("bstudy", tracking_uri=uri, out_dir=tmp_path / "compare", log_to_parent=False)
    [rec] = res.records
    assert rec["init"] == "ssl" and rec["status"] == "ok"


def test_method_and_optimizer_overrides_take_effect_via_medssl_bundle_run(pool: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medssl.cli import app

    out = tmp_path / "rot"
    args = ["bundle", "run", str(TRAIN), "--set", f"datalist={pool}", "--set", f"output_dir={out}",
            "--set", "method=rotation", "--set", "optimizer._target_=torch.optim.SGD",
            "--set", "optimizer.momentum=0.9", "--set", "experiment=None", "--"]
    for k, v in {**TINY, "total_steps": 2, "checkpoint_every": 0}.items():
        args += [f"--{k}", json.dumps(v)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["recipe"]["method"] == "rotation" and ckpt["config"]["method"] == "rotation"
    assert {k.split(".")[0] for k in ckpt["model"]} == {"encoder", "head"}  # RotationPrediction's, not SimCLR's projector
    groups = ckpt["optimizer"]["param_groups"]
    assert all(g["momentum"] == 0.9 and "betas" not in g for g in groups)  # SGD ran, not AdamW
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # the CLI's decay / no-decay groups


def test_resume_through_the_bundle_is_exact(pool: Path, tmp_path: Path) -> None:
    from medssl.bundles.check import run_bundle

    common = {"datalist": str(pool), "experiment": None, **TINY}
    run_bundle(TRAIN, output_dir=str(tmp_path / "full"), **common)
    full = _losses(tmp_path / "full")
    run_bundle(TRAIN, output_dir=str(tmp_path / "resumed"),
               resume=str(tmp_path / "full" / "checkpoints" / "step_0000002.pt"), **common)
    assert _losses(tmp_path / "resumed") == [full[2]]


def test_set_and_monai_spelling_resolve_alike() -> None:
    sets = bundle_overrides(["optimizer.lr=1e-4", "roi_size=[16,16,16]", "amp=None", "network_def.name=vit"])
    monai = bundle_overrides(args=["--optimizer#lr", "1e-4", "--roi_size", "[16, 16, 16]", "--amp=None",
                                   "--network_def#name", "vit"])
    assert sets == monai == {"optimizer#lr": 1e-4, "roi_size": [16, 16, 16], "amp": None, "network_def#name": "vit"}
    a, b = resolve_bundle([TRAIN], sets), resolve_bundle([TRAIN], monai)
    assert a.get() == b.get()
    assert a.get_parsed_content("config") == b.get_parsed_content("config")
    assert a.get_parsed_content("config").roi_size == [16, 16, 16]


@pytest.mark.parametrize(("override", "words"), [
    ({"optimizer#lrr": 1e-4}, ["key 'optimizer#lrr' does not exist", "did you mean 'optimizer#lr'?"]),
    ({"optimiser#lr": 1e-4}, ["key 'optimiser#lr' does not exist", "did you mean 'optimizer#lr'?"]),
    ({"network_def#_target_": "Foo"}, ["unknown _target_ 'Foo' at key 'network_def'"]),
    ({"augment": {"_target_": "medssl.nope.Aug"}}, ["unknown _target_ 'medssl.nope.Aug' at key 'augment'"]),
])
def test_bad_override_is_one_line_naming_key_and_file(override: dict, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(MedsslError) as e:
        run_bundle_config([TRAIN], overrides={"output_dir": str(tmp_path / "never"), **override})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{TRAIN}: ")
    for w in words:
        assert w in msg
    assert not (tmp_path / "never").exists()  # refused before anything ran


def test_unknown_target_in_a_variant_file_and_bad_method_argument(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medssl.cli import app

    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump({"lr_scheduler": {"_target_": "NoSuchSchedule", "optimizer": "@optimizer"}}))
    res = CliRunner().invoke(app, ["bundle", "run", str(TRAIN), "--variant", str(variant)])
    assert res.exit_code == 1
    assert f"{variant}: unknown _target_ 'NoSuchSchedule' at key 'lr_scheduler'" in " ".join(res.output.split())
    # a method argument that does not exist: refused when the part is built, naming the argument and the file
    with pytest.raises(MedsslError) as e:
        run_bundle_config([TRAIN], overrides={"ssl_method#temprature": 0.2, "output_dir": str(tmp_path / "x"),
                                              "experiment": None, "device": "cpu"})
    assert str(e.value).startswith(f"{TRAIN}: ") and "'temprature'" in str(e.value) and "temperature" in str(e.value)


def test_metadata_valid_offline_and_variant_overrides_only() -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"),
                    filepath=str(REPO / "bundles" / "schema" / "metadata_schema.json"))
    base = yaml.safe_load(TRAIN.read_text())
    multi = yaml.safe_load((CONFIGS / "multi_gpu_train.yaml").read_text())
    assert set(multi) <= set(base)  # the variant only overrides existing ids
    targets = {k for k, v in base.items() if isinstance(v, dict) and "_target_" in v}
    assert {"network_def", "ssl_method", "augment", "optimizer", "lr_scheduler", "config", "parts", "trainer"} <= targets


def test_evaluate_yaml_knn_probe_equals_the_training_monitor(hippocampus_dir: Path, tmp_path: Path) -> None:
    from medssl.bundles.check import run_bundle

    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:4]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [
        {"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": p.name[:-7]}
        for p in images]}))
    common = {"datalist": str(tmp_path / "datalist.json"), "output_dir": str(tmp_path / "run"), "experiment": None,
              **TINY, "total_steps": 1, "monitor_every": 1}
    run_bundle(TRAIN, **common)
    trained = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    run_bundle([TRAIN, CONFIGS / "evaluate.yaml"], **common)
    probe = json.loads((tmp_path / "run" / "eval" / "knn.json").read_text())
    assert trained["step"] == 1 and 0.0 <= probe["monitor/knn_acc"] <= 1.0
    for k in ("monitor/knn_acc", "monitor/knn_balanced_acc"):
        assert probe[k] == pytest.approx(trained[k], abs=1e-9)
    assert probe["monitor.cases"] == 4
