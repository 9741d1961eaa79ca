"""``medssl compare`` against real MLflow sqlite stores: sweeps with the fake finetune, and hand-made runs
(NaN / missing metrics, mixed config hashes, summary metrics on the parent run)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from medssl.cli import app
from medssl.engines.studies.sweep import run_sweep
from medssl.errors import MedsslError
from medssl.tracking.compare import DIFF, Cell, compare_study, summary_metrics
from medssl.tracking.mlflow_tracker import make_client
from medssl.tracking.stats import mean_ci
from tests.engines.studies.test_sweep import (
    FakeFinetune,
    FakePretrain,
    fake_value,
    fresh_sqlite_uri,
    pipeline,
)


def test_compare_study_table_csv_png_and_artifacts(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="cmp", fractions=[10, 50, 100], seeds=[0, 1, 2])
    # seed 2 of ssl@10 fails: that fraction has n=2 for ssl, n=3 for scratch and 2 matched pairs
    res = run_sweep(spec, finetune_fn=FakeFinetune(fail={"f10-ssl-s2"}), pretrain_fn=FakePretrain())
    assert len(res.failed) == 1
    out = compare_study("cmp", tracking_uri=uri, out_dir=tmp_path / "cmp")
    assert out.metric == "test_dice_mean" and out.parent_run_id == res.parent_run_id
    assert len(out.records) == 3 * 2 * 3 - 1

    rows = {(float(r["fraction"]), r["init"]): r for r in csv.DictReader(open(out.csv_path))}
    for frac in (10, 50, 100):
        for init in ("scratch", "ssl"):
            seeds = [0, 1] if (frac, init) == (10, "ssl") else [0, 1, 2]
            ref = mean_ci([fake_value(frac, init, s) for s in seeds])
            row = rows[(frac, init)]
            assert int(row["n"]) == len(seeds) and row["seeds"] == " ".join(map(str, seeds))
            assert float(row["mean"]) == pytest.approx(ref.mean)
            assert float(row["ci_low"]) == pytest.approx(ref.low) and float(row["ci_high"]) == pytest.approx(
                ref.high
            )
    # the fake gives SSL exactly +0.05 on every seed: paired difference 0.05 with a zero-width interval
    diff = rows[(10.0, "ssl-scratch")]
    assert int(diff["n"]) == 2 and float(diff["mean"]) == pytest.approx(0.05)
    assert float(diff["ci_high"]) - float(diff["ci_low"]) == pytest.approx(0.0, abs=1e-9)

    assert out.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.png_path.stat().st_size > 5000
    client = make_client(uri)
    logged = {Path(a.path).name for a in client.list_artifacts(res.parent_run_id, "compare")}
    assert logged == {out.csv_path.name, out.png_path.name}

    text = io.StringIO()
    Console(file=text, width=160).print(out.table)
    rendered = text.getvalue()
    assert "cmp: test_dice_mean" in rendered and "0.050 ± 0.000" in rendered
    ref = mean_ci([fake_value(100, "ssl", s) for s in (0, 1, 2)])
    assert f"{ref.mean:.3f} ± {ref.half_width:.3f}" in rendered

    # another metric, default out dir under the sweep folder
    out2 = compare_study("cmp", tracking_uri=uri, metric="test_dice_2")
    assert out2.csv_path.parent == res.sweep_dir / "compare"
    assert out2.summaries[(100.0, "scratch")].mean == pytest.approx(
        sum(fake_value(100, "scratch", s) + 0.01 for s in (0, 1, 2)) / 3
    )


def test_single_seed_shows_n1_and_errors(tmp_path: Path) -> None:
    uri = fresh_sqlite_uri(tmp_path)
    spec = pipeline(tmp_path, uri, study="one-seed", fractions=[10, 100], seeds=[0])
    run_sweep(spec, finetune_fn=FakeFinetune(), pretrain_fn=FakePretrain())
    out = compare_study("one-seed", tracking_uri=uri, out_dir=tmp_path / "o")
    text = io.StringIO()
    Console(file=text, width=160).print(out.table)
    assert "(n=1, no CI)" in text.getvalue()
    row = next(r for r in csv.DictReader(open(out.csv_path)) if r["init"] == "ssl")
    assert row["n"] == "1" and row["ci_low"] == "" and row["ci_high"] == ""
    with pytest.raises(MedsslError, match=r"no study 'nope'.*known studies: \['one-seed'\]"):
        compare_study("nope", tracking_uri=uri)
    with pytest.raises(MedsslError, match="no FINISHED child run logged 'test_auc'.*test_dice_mean"):
        compare_study("one-seed", tracking_uri=uri, metric="test_auc")


# -- hand-made studies: a parent run and children with exactly the tags / metrics under test -----------------


class Study:
    """A parent sweep run and its children in a fresh sqlite store; ``child`` adds one FINISHED child."""

    def __init__(self, tmp: Path, name: str = "hand") -> None:
        self.uri = fresh_sqlite_uri(tmp)
        self.client = make_client(self.uri)
        # artifacts beside the store (the default "./mlruns" would write into the cwd)
        self.exp = self.client.create_experiment(f"{name}-exp", artifact_location=(tmp / "artifacts").as_uri())
        tags = {"medssl.kind": "sweep", "medssl.study": name, "medssl.metric": "test_dice_mean"}
        self.parent = self.client.create_run(self.exp, tags=tags, start_time=1_000).info.run_id
        self.name, self.clock = name, 2_000

    def child(self, frac: float, init: str, seed: int, value: float | None, **tags: str) -> str:
        self.clock += 1_000  # strictly increasing start times: the last child added is the newest
        t = {
            "mlflow.parentRunId": self.parent,
            "medssl.kind": "finetune",
            "medssl.fraction": f"{frac:g}",
            "medssl.init": init,
            "medssl.seed": str(seed),
            "medssl.sweep_key": f"f{frac:g}-{init}-s{seed}",
            **tags,
        }
        run = self.client.create_run(self.exp, tags=t, start_time=self.clock).info.run_id
        self.client.log_metric(run, "train_loss", 0.5)
        if value is not None:
            self.client.log_metric(run, "test_dice_mean", value)
        self.client.set_terminated(run, "FINISHED")
        return run


def _cli(st: Study, out: Path, *extra: str) -> Any:
    """``medssl compare --study <study>`` on the study's store through the CLI."""
    args = ["compare", "--study", st.name, "--tracking-uri", st.uri, "-o", str(out), *extra]
    return CliRunner().invoke(app, args)


def _render(table: Any) -> str:
    text = io.StringIO()
    Console(file=text, width=200).print(table)
    return text.getvalue()


def test_nan_and_missing_metrics_are_counted_not_fatal(tmp_path: Path) -> None:
    st = Study(tmp_path)
    ssl10 = {0: 0.80, 1: 0.82, 2: 0.84}
    for seed, v in ssl10.items():
        st.child(10, "ssl", seed, v)
    st.child(10, "scratch", 0, 0.70)
    st.child(10, "scratch", 1, math.nan)  # e.g. AUC of a single-class test set
    st.child(10, "scratch", 2, None)  # finished without the metric
    st.child(50, "ssl", 0, math.nan)  # no finite value at all in this cell
    st.child(50, "scratch", 0, 0.75)
    st.child(100, "ssl", 0, 0.9)
    out = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o")
    status = {(r["fraction"], r["init"], r["seed"]): r["status"] for r in out.records}
    assert status[(10.0, "scratch", 1)] == "nonfinite" and status[(10.0, "scratch", 2)] == "missing"
    assert out.cells[(10.0, "scratch")] == Cell(1, missing=1, nonfinite=1, config_hash="unknown")
    assert out.cells[(10.0, "ssl")].n == 3 and out.cells[(50.0, "ssl")] == Cell(0, 0, 1, "unknown")
    assert out.summaries[(10.0, "ssl")].mean == pytest.approx(0.82)
    assert out.summaries[(10.0, "scratch")].n == 1 and out.summaries[(10.0, "scratch")].low is None
    assert (50.0, "ssl") not in out.summaries  # nothing to average: no summary, no crash
    d = out.summaries[(10.0, DIFF)]  # paired over the only seed finite in both arms
    assert d.seeds == (0,) and d.mean == pytest.approx(0.10) and d.half_width is None
    assert out.cells[(10.0, DIFF)].n == 1 and (50.0, DIFF) not in out.summaries
    rendered = _render(out.table)
    assert "1 (1 missing, 1 NaN)" in rendered and "0 (1 NaN)" in rendered and "0.100 (n=1, no CI)" in rendered
    rows = {(float(r["fraction"]), r["init"]): r for r in csv.DictReader(open(out.csv_path))}
    assert rows[(10.0, "scratch")]["n"] == "1" and rows[(10.0, "scratch")]["missing"] == "1"
    assert rows[(10.0, "scratch")]["nonfinite"] == "1" and rows[(10.0, "scratch")]["ci_low"] == ""
    assert rows[(50.0, "ssl")]["n"] == "0" and rows[(50.0, "ssl")]["mean"] == ""
    assert out.png_path.stat().st_size > 5000
    res = _cli(st, tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "summary metrics" in res.output


def test_compare_refuses_mixed_config_hashes_unless_one_is_chosen(tmp_path: Path) -> None:
    st = Study(tmp_path)
    st.child(10, "ssl", 0, 0.80)  # an old run: no hash tag ("unknown")
    st.child(10, "ssl", 1, 0.81, **{"medssl.config_hash": "aaaa1111"})
    st.child(10, "ssl", 2, 0.60, **{"medssl.config_hash": "bbbb2222"})
    st.child(10, "ssl", 0, 0.62, **{"medssl.config_hash": "bbbb2222"})  # newest: seed 0 re-run with config b
    for seed in (0, 1, 2):  # scratch may differ from ssl (finetune_by_init): not a mix
        st.child(10, "scratch", seed, 0.5 + 0.01 * seed, **{"medssl.config_hash": "cccc3333"})
    with pytest.raises(MedsslError) as err:
        compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o")
    msg = str(err.value)
    assert "10 % ssl" in msg and "2 different finetune configs" in msg
    assert "aaaa1111 (1 child, e.g. f10-ssl-s1)" in msg and "bbbb2222 (2 children, e.g. f10-ssl-s0)" in msg
    assert "--config-hash" in msg
    latest = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o", config_hash="latest")
    assert {(r["seed"], r["config_hash"]) for r in latest.records if r["init"] == "ssl"} == {
        (0, "bbbb2222"),
        (2, "bbbb2222"),
    }
    assert latest.summaries[(10.0, "ssl")].mean == pytest.approx(0.61)
    assert latest.cells[(10.0, "ssl")].config_hash == "bbbb2222"
    picked = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o", config_hash="aaaa,cccc")
    assert picked.summaries[(10.0, "ssl")].n == 1 and picked.summaries[(10.0, "scratch")].n == 3
    old = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o", config_hash="unknown,cccc")
    assert old.summaries[(10.0, "ssl")].mean == pytest.approx(0.80)  # the old seed-0 run, not its re-run
    with pytest.raises(MedsslError, match=r"no finished child has config hash 'zzz'.*aaaa1111"):
        compare_study("hand", tracking_uri=st.uri, config_hash="zzz")
    res = _cli(st, tmp_path / "c")
    assert res.exit_code == 1 and "different finetune configs" in res.output and "Traceback" not in res.output
    res = _cli(st, tmp_path / "c", "--config-hash", "latest")
    assert res.exit_code == 0, res.output


def test_runs_of_several_machine_kinds_are_named(tmp_path: Path) -> None:
    st = Study(tmp_path)
    xeon, epyc = "Intel Xeon | AVX512", "AMD EPYC | AVX2"
    for seed in (0, 1, 2):
        st.child(10, "scratch", seed, 0.80 + 0.01 * seed, **{"medssl.machine": xeon})
    st.child(10, "ssl", 0, 0.81, **{"medssl.machine": xeon})
    st.child(10, "ssl", 1, 0.82, **{"medssl.machine": epyc})
    st.child(10, "ssl", 2, 0.83)  # from before the tag: not a kind
    res = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o", log_to_parent=False)
    assert {r["seed"]: r["machine"] for r in res.records if r["init"] == "ssl"} == {0: xeon, 1: epyc, 2: "unknown"}
    assert res.machine_note is not None and "2 machine kinds (Intel Xeon | AVX512: 4, AMD EPYC | AVX2: 1)" in \
        res.machine_note
    out = _cli(st, tmp_path / "c")
    assert out.exit_code == 0 and "machine kinds" in out.output
    same = Study(tmp_path / "same")
    for seed in (0, 1):
        same.child(10, "scratch", seed, 0.8, **{"medssl.machine": epyc})
        same.child(10, "ssl", seed, 0.8)
    assert compare_study("hand", tracking_uri=same.uri, out_dir=tmp_path / "o2", log_to_parent=False).machine_note is None


def test_summary_metrics_are_logged_on_the_parent_run(tmp_path: Path) -> None:
    st = Study(tmp_path)
    for seed in (0, 1, 2):
        st.child(12.5, "ssl", seed, 0.80 + 0.02 * seed)
        st.child(12.5, "scratch", seed, 0.70 + 0.01 * seed)
    st.child(100, "ssl", 0, 0.9)
    st.child(100, "scratch", 0, 0.85)
    out = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o")
    logged = st.client.get_run(st.parent).data.metrics
    assert logged == pytest.approx(out.parent_metrics) and out.parent_metrics
    ssl = mean_ci([0.80, 0.82, 0.84])
    delta = mean_ci([0.10, 0.11, 0.12])
    m = "test_dice_mean/f12_5_"
    assert logged[m + "ssl_mean"] == pytest.approx(ssl.mean) and logged[m + "ssl_n"] == 3
    assert logged[m + "ssl_ci_low"] == pytest.approx(ssl.low)
    assert logged[m + "ssl_ci_high"] == pytest.approx(ssl.high)
    assert logged[m + "scratch_mean"] == pytest.approx(0.71) and logged[m + "scratch_missing"] == 0
    assert logged[m + "delta_mean"] == pytest.approx(delta.mean)
    assert logged[m + "delta_ci_low"] == pytest.approx(delta.low) and logged[m + "delta_n"] == 3
    # one seed: a mean and n, but no CI bounds (absent, not NaN)
    assert logged["test_dice_mean/f100_delta_mean"] == pytest.approx(0.05)
    assert "test_dice_mean/f100_ssl_ci_low" not in logged and logged["test_dice_mean/f100_ssl_n"] == 1
    assert all(math.isfinite(v) for v in logged.values())
    # the pure function: NaN-only cells report n and missing, no mean
    names = summary_metrics({}, {(10.0, "ssl"): Cell(0, missing=1, nonfinite=2)}, "test_auc")
    assert names == {"test_auc/f10_ssl_n": 0.0, "test_auc/f10_ssl_missing": 3.0}


def test_per_seed_values_in_the_csv_and_sign_count_in_the_table(tmp_path: Path) -> None:
    st = Study(tmp_path, "signs")
    scratch = {0: 0.80, 1: 0.70, 2: 0.75}
    ssl = {0: 0.85, 1: 0.68, 2: 0.80}  # ahead on seeds 0 and 2, behind on seed 1
    for s in scratch:
        st.child(10, "scratch", s, scratch[s])
        st.child(10, "ssl", s, ssl[s])
    out = compare_study("signs", tracking_uri=st.uri, out_dir=tmp_path / "o")
    rows = {r["init"]: r for r in csv.DictReader(open(out.csv_path))}
    assert [float(v) for v in rows["scratch"]["values"].split()] == pytest.approx([0.80, 0.70, 0.75])
    assert rows[DIFF]["seeds"] == "0 1 2"
    assert [float(v) for v in rows[DIFF]["values"].split()] == pytest.approx([0.05, -0.02, 0.05])
    assert out.summaries[(10.0, DIFF)].signs == (2, 1)
    assert "3 (2+ 1−)" in _render(out.table)
