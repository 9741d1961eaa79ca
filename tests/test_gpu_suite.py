"""benchmarks/gpu_suite.sh: its CPU dry run end to end (every part writes sane JSON + Markdown), the import
audit against the GPU image's packages, the failure records, and the GPU pipeline file."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
PARTS = ["augment_gpu", "pretrain_gpu", "study_gpu"]
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OUT", "GPU_SUITE_WORK", "GPU_SUITE_DRY_RUN", "MLFLOW_TRACKING_URI", "GPU_SUITE_ALLOWED")}
    return env | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, hippocampus_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One CPU dry run of the whole suite (≈ 2 min on 2 cores), shared by the tests below."""
    if BASH is None:
        pytest.skip("bash is not installed")
    out = tmp_path_factory.mktemp("gpu_suite")
    datasets = hippocampus_dir.parent
    if hippocampus_dir.name != "msd_task04_hippocampus":  # the shipped sample: the suite reads $MEDSSL_DATASETS/msd_…
        datasets = tmp_path_factory.mktemp("datasets")
        (datasets / "msd_task04_hippocampus").symlink_to(hippocampus_dir, target_is_directory=True)
    proc = subprocess.run([BASH, str(SUITE), "--dry-run", str(out)], capture_output=True, text=True,
                          env=_env(MEDSSL_DATASETS=str(datasets)), timeout=600, cwd=REPO)
    return out, proc


def _json(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def _pos(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@needs_bash
@pytest.mark.timeout(660)
def test_dry_run_writes_every_part(dry_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = dry_run
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    for name in [*PARTS, "suite"]:
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file(), name
    suite = _json(out, "suite")
    assert suite["dry_run"] is True and [p["part"] for p in suite["parts"]] == PARTS
    for p in suite["parts"]:
        assert p["rc"] == 0 and not p["timed_out"] and 0 < p["wall_s"] <= p["cap_s"] + 20, p
    assert suite["machine"]["torch"] and suite["machine"]["gpu"] is None  # CI: no GPU
    md = (out / "suite.md").read_text()
    for name in PARTS:  # every fragment is pasted into suite.md and says it is a dry run
        frag = (out / f"{name}.md").read_text()
        assert frag.startswith("### ") and "DRY RUN" in frag.splitlines()[0], frag[:200]
        assert frag.strip() in md
    assert "[gpu_suite] part 3:" in proc.stdout and "total wall" in proc.stdout  # prints what ran


@needs_bash
@pytest.mark.timeout(660)
def test_dry_run_augment_numbers_are_consistent(dry_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    a = _json(dry_run[0], "augment_gpu")
    assert a["dry_run"] and _pos(a["tutorial_cpu_pairs_s"]) and a["machine"]["device"] == "cpu"
    (row,) = a["rows"]
    assert row["status"] == "ok", row
    assert _pos(row["aug_pairs_s"]) and _pos(row["model_ms_fp32"]) and "model_ms_bf16" not in row  # no CUDA
    assert row["aug_ms_per_batch"] == pytest.approx(1e3 * row["batch"] / row["aug_pairs_s"])
    assert row["x_tutorial"] == pytest.approx(row["aug_pairs_s"] / a["tutorial_cpu_pairs_s"])
    assert row["aug_over_model"] == pytest.approx(row["aug_ms_per_batch"] / row["model_ms_fp32"])
    assert 0 < row["aug_share"] < 1 and row["starves_model"] == (row["aug_over_model"] >= 1)
    assert a["goal_met"] == (row["x_tutorial"] >= a["goal_x"]) and a["goal_x"] == 50


@needs_bash
@pytest.mark.timeout(660)
def test_dry_run_pretrain_rows(dry_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    p = _json(dry_run[0], "pretrain_gpu")
    rows = {(r["method"], r["precision"]): r for r in p["rows"]}
    assert set(rows) == {(m, prec) for m in ("simclr", "genesis") for prec in ("fp32", "bf16")}
    for (method, prec), r in rows.items():
        assert r["status"] == "ok", r
        assert _pos(r["steps_s"]) and _pos(r["samples_s"]) and _pos(r["cold_steps_s"]) and _pos(r["params_M"])
        assert r["samples_s"] == pytest.approx(r["steps_s"] * r["batch"])
        assert math.isfinite(r["last_loss"]) and len(r["steps_s_rounds"]) == p["rounds"]
        assert r["amp_effective"] is False  # on the CPU amp=bf16 is ignored (and recorded as such)
        if prec == "bf16":
            assert r["bf16_speedup"] == pytest.approx(r["steps_s"] / rows[(method, "fp32")]["steps_s"])
    assert "(ignored: not CUDA)" in (dry_run[0] / "pretrain_gpu.md").read_text()


@needs_bash
@pytest.mark.timeout(660)
def test_dry_run_study_ran_sweep_compare_and_report(dry_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out = dry_run[0]
    s = _json(out, "study_gpu")
    assert {k: v["rc"] for k, v in s["steps"].items()} == {"sweep": 0, "compare": 0, "report": 0}
    assert s["parent_run_id"] and s["error"] is None and s["report_included"]
    assert s["tracking_uri"].startswith("sqlite:///") and s["tracking_uri"].endswith("/study/mlruns.db")
    kids = {c["key"]: c for c in s["children"]}
    expected = {f"f{f}-{i}-s0" for f in (5, 10, 100) for i in ("scratch", "ssl")}
    assert set(kids) == expected | {"pretrain"} and s["finished_finetune_children"] == 6
    for key in expected:
        c = kids[key]
        assert c["status"] == "FINISHED" and 0.0 <= c["test_dice_mean"] <= 1.0 and _pos(c["wall_s"]), c
    md = (out / "study_gpu.md").read_text()
    assert "| f10-ssl-s0 | FINISHED |" in md and "label_efficiency.py --report-only" in md
    assert "| 100 | 1 |" in md  # label_efficiency.py's table: fraction 100, one seed
    assert "Labels needed: test_dice_mean ≥" in md and "[measured at 5, 10, 100 %]" in md  # the headline


def _sitecustomize() -> Any:
    spec = importlib.util.spec_from_file_location("suite_audit", REPO / "benchmarks" / "_audit" / "sitecustomize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; nothing is installed without the variables
    return mod


@needs_bash
@pytest.mark.timeout(660)
def test_dry_run_imports_only_what_the_gpu_image_has(dry_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    """Every module any process of the suite imported belongs to a distribution of the GPU image or the
    carried wheels (or to none: this repository); the dry run ran with the others refused."""
    from importlib.metadata import packages_distributions

    files = list((dry_run[0] / "work" / "imports").glob("*.txt"))
    assert len(files) >= 6  # env, 3 parts, sweep, compare, report, summaries
    names = {n for f in files for n in f.read_text().split()}
    assert {"torch", "monai", "mlflow", "medssl", "nibabel"} <= names
    audit = _sitecustomize()
    allowed = audit._allowed(str(REPO / "benchmarks" / "gpu_image_packages.txt"))
    assert {"mlflow", "sqlalchemy", "monai", "torch", "medssl"} <= allowed  # mlflow +deps expanded
    dists = packages_distributions()
    bad = sorted(n for n in names if not n.startswith("!") and n in dists
                 and not any(audit._norm(d) in allowed for d in dists[n]))
    assert not bad, f"imported but not on the GPU image: {bad}"


def test_refused_import_and_failure_record(tmp_path: Path) -> None:
    """The audit refuses a distribution missing from the allowed list (and only that); a part that wrote
    nothing gets a failure record naming the timeout and the end of its log."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("# test\nnumpy\n")
    code = "import numpy\ntry:\n    import yaml\nexcept ModuleNotFoundError as e:\n    print('refused', e.name)\n"
    env = _env(GPU_SUITE_ALLOWED=str(allowed), GPU_SUITE_IMPORTS=str(tmp_path / "imp"),
               PYTHONPATH=str(REPO / "benchmarks" / "_audit"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "refused yaml" in res.stdout, res.stderr
    (rec,) = (tmp_path / "imp").glob("*.txt")
    assert "!yaml" in rec.read_text().split() and "numpy" in rec.read_text().split()

    log = tmp_path / "p.log"
    log.write_text("line 1\nTraceback: boom\n")
    out = tmp_path / "out"
    args = ["--out", str(out), "--part", "pretrain_gpu", "--rc", "124", "--wall", "85.2", "--cap", "85", "--log", str(log)]
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "_suite.py"), "fallback", *args], check=True,
                   env=_env(), timeout=120)
    rec = _json(out, "pretrain_gpu")
    assert rec["timed_out"] and rec["rc"] == 124 and rec["status"] == "timed out after 85 s"
    assert "Traceback: boom" in rec["log_tail"] and "Traceback: boom" in (out / "pretrain_gpu.md").read_text()


@needs_bash
def test_usage_errors() -> None:
    env = _env()
    assert subprocess.run([BASH, str(SUITE), "--help"], capture_output=True, env=env).returncode == 0
    bad = subprocess.run([BASH, str(SUITE), "--fast"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
    none = subprocess.run([BASH, str(SUITE)], capture_output=True, text=True, env=env)
    assert none.returncode == 2 and "output folder" in none.stderr


def test_gpu_pipeline_file() -> None:
    """pipelines/label_efficiency_gpu.yaml: one seed of the CPU study's grid, wider net, more steps, CUDA."""
    from medssl.config import PretrainConfig
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.studies.pipeline import finetune_dict, load_pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSSL_DATASETS", "/nonexistent")
        gpu = load_pipeline(REPO / "pipelines" / "label_efficiency_gpu.yaml")
        cpu = load_pipeline(REPO / "pipelines" / "label_efficiency.yaml")
    assert gpu.study != cpu.study and gpu.seeds == [0] and gpu.inits == ["scratch", "ssl"]
    assert {5.0, 10.0, 100.0} <= set(gpu.fractions) and gpu.metric == "test_dice_mean"
    assert gpu.pretrain["method"] == "simclr" and gpu.finetune["network"] == "SegResNet"
    assert gpu.pretrain["encoder_kwargs"]["init_filters"] == gpu.finetune["network_kwargs"]["init_filters"] == 16
    assert gpu.pretrain["device"] == gpu.finetune["device"] == "cuda" and gpu.pretrain["amp"] == "bf16"
    assert gpu.finetune["max_steps"] > cpu.finetune["max_steps"]
    assert gpu.pretrain["total_steps"] * gpu.pretrain["batch_size"] > cpu.pretrain["total_steps"] * cpu.pretrain["batch_size"]
    assert gpu.data["sources"] == cpu.data["sources"] and gpu.pretrain["augment_kwargs"] == {"flip_prob": 0.0}
    PretrainConfig.from_dict(gpu.pretrain)
    for f in gpu.fractions:
        for init in gpu.inits:
            FinetuneConfig.from_dict({**finetune_dict(gpu, f, init), "fraction": f})
