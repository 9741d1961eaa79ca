"""`medssl split --report`: counts per split / class / patient group and PASS/FAIL leakage checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medssl.cli import app
from medssl.data.splits import make_splits, split_datalist
from medssl.data.splits_report import check_splits, report_lines, splits_report
from medssl.errors import MedsslError


def _datalist(tmp_path: Path) -> tuple[Path, list[dict]]:
    """20 patients with 2 classified scans each + an unlabelled follow-up scan of every 4th patient."""
    items = [{"image": f"p{p}_{k}.nii.gz", "case_id": f"p{p:02d}s{k}", "group_id": f"g{p:02d}", "class": p % 2}
             for p in range(20) for k in range(2)]
    unl = [{"image": f"p{p}_u.nii.gz", "case_id": f"p{p:02d}u", "group_id": f"g{p:02d}"} for p in range(0, 20, 4)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items, "unlabeled": unl}))
    return dl, items + unl


def test_report_counts_and_passes(tmp_path: Path):
    dl, items = _datalist(tmp_path)
    _, sp = split_datalist(dl, fractions=[50, 100], seeds=[0, 1], test_fraction=0.2, val_fraction=0.2)
    rep = splits_report(sp, items)
    assert rep["ok"] and [c["name"] for c in rep["checks"]] == [
        "datalist", "groups", "fractions", "pretrain pool", "pool groups", "seed pools"]
    rows = {r["split"]: r for r in rep["rows"]}
    assert rows["test"]["cases"] == len(sp["test"]) == 2 * rows["test"]["groups"]
    assert rows["test"]["classes"] == {"0": 4, "1": 4} and rep["classes"] == ["0", "1"]
    assert rows["pretrain pool (study)"]["cases"] == len(sp["pretrain_pool"])
    assert rows["seed 1 50 %"]["cases"] == len(sp["seeds"]["1"]["fractions"]["50"])
    assert all(line.startswith("PASS ") for line in report_lines(rep))


def test_report_fails_on_crossing_groups_and_pool_leaks(tmp_path: Path):
    dl, items = _datalist(tmp_path)
    ungrouped = [{k: v for k, v in it.items() if k != "group_id"} for it in items]
    v1 = make_splits(ungrouped, fractions=[100], seeds=[0], test_fraction=0.3)  # per case, as version 1 did
    rep = splits_report(v1, items)
    failed = {c["name"]: c["detail"] for c in rep["checks"] if not c["ok"]}
    assert not rep["ok"] and "groups" in failed and "patient group(s) in both test and" in failed["groups"]
    assert "pool groups" in failed and "pretrain pool" not in failed  # case-disjoint, but same patients
    sp = make_splits(items, fractions=[100], seeds=[0, 1])
    sp["pretrain_pool"] = sorted(sp["pretrain_pool"] + sp["seeds"]["1"]["validation"][:1])
    failed = {c["name"]: c["detail"] for c in splits_report(sp, items)["checks"] if not c["ok"]}
    assert set(failed) == {"pretrain pool", "pool groups"}
    assert failed["pretrain pool"].startswith("1 test/validation case(s) in the pretraining pool")
    sp = make_splits(items, fractions=[100], seeds=[0])
    sp["test"].append("ghost")
    assert "not in the datalist" in {c["name"]: c["detail"] for c in splits_report(sp, items)["checks"]}["datalist"]


def test_check_splits_refuses_a_leaking_file(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    dl, _ = _datalist(tmp_path)
    path, sp = split_datalist(dl, fractions=[100], seeds=[0, 1])
    with caplog.at_level("INFO", logger="medssl.data.splits_report"):
        assert check_splits(dl, path)["ok"]
    assert "PASS pool groups" in caplog.text and "pretrain pool (study)" in caplog.text
    sp["pretrain_pool"].append(sp["test"][0])
    path.write_text(json.dumps(sp))
    with pytest.raises(MedsslError, match=r"splits.json: leakage check failed: pretrain pool: 1 test"):
        check_splits(dl, path)


def test_cli_split_then_report(tmp_path: Path):
    dl, _ = _datalist(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(app, ["split", str(dl), "--report"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    res = runner.invoke(app, ["split", str(dl), "--fractions", "50,100", "--seeds", "0,1"])
    assert res.exit_code == 0, res.output
    assert "PASS groups" in res.output and "pretrain pool (study)" in res.output
    before = (tmp_path / "splits.json").read_text()
    res = runner.invoke(app, ["split", str(dl), "--report", "--seeds", "7"])  # reports, never re-splits
    assert res.exit_code == 0 and "seed 1 validation" in res.output and "seed 7" not in res.output
    assert (tmp_path / "splits.json").read_text() == before
    sp = json.loads(before)
    sp["pretrain_pool"].append(sp["seeds"]["0"]["validation"][0])
    (tmp_path / "splits.json").write_text(json.dumps(sp))
    bad = runner.invoke(app, ["split", str(dl), "--report"])
    assert bad.exit_code == 1 and "FAIL pretrain pool" in bad.output and "leakage check failed" in bad.output
