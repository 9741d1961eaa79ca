from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from rich.console import Console

from medssl.engines.sweep import run_sweep
from medssl.errors import MedsslError
from medssl.tracking.compare import compare_study
from medssl.tracking.mlflow_tracker import make_client
from medssl.tracking.stats import mean_ci
from tests.test_sweep import FakeFinetune, FakePretrain, fake_value, fresh_sqlite_uri, pipeline


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
    assert "(n=1)" in text.getvalue()
    row = next(r for r in csv.DictReader(open(out.csv_path)) if r["init"] == "ssl")
    assert row["n"] == "1" and row["ci_low"] == "" and row["ci_high"] == ""
    with pytest.raises(MedsslError, match=r"no study 'nope'.*known studies: \['one-seed'\]"):
        compare_study("nope", tracking_uri=uri)
    with pytest.raises(MedsslError, match="no FINISHED child run logged 'test_auc'.*test_dice_mean"):
        compare_study("one-seed", tracking_uri=uri, metric="test_auc")
