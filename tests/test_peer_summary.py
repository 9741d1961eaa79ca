"""benchmarks/peer_summary.py: nnU-Net peer results over seeds beside medssl's per-seed values (issue 12, item 2),
with the statistics of ``medssl compare`` (mean ± Student-t CI, pairs matched by seed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medssl.errors import MedsslError
from medssl.tracking.stats import mean_ci

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import peer_summary  # noqa: E402


def _result(root: Path, name: str, *, fraction: float, seed: int, dice: float, batch_spec: str = "planner",
            batch: int = 2, iterations: int = 1125, device: str = "cpu", tta: bool = True,
            minutes: float | None = None, matched: bool = False) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "result.json").write_text(json.dumps({
        "fraction": fraction, "seed": seed, "batch": batch, "batch_spec": batch_spec, "iterations": iterations,
        "device": device, "tta_mirroring": tta, "metrics": {"dice_mean": dice, "hd95_mean": 1.8},
        "budget_minutes": minutes, "matched_medssl": {"minutes": minutes, "medssl_steps": 2400} if matched else None,
    }))


def _csv(path: Path) -> Path:
    path.write_text(
        "fraction,init,n,missing,nonfinite,mean,std,ci_low,ci_high,seeds,values,config_hash\n"
        "10.0,scratch,3,0,0,0.853,0.0025,0.847,0.859,0 1 2,0.8552 0.8502 0.8535,aa\n"
        "10.0,ssl,3,0,0,0.850,0.0012,0.847,0.853,0 1 2,0.8510 0.8486 0.8504,bb\n"
        "5.0,scratch,3,0,0,0.844,0.002,0.839,0.849,0 1 2,0.8455 0.8453 0.8419,cc\n"
    )
    return path


def test_pairs_by_seed_with_compares_statistics(tmp_path: Path) -> None:
    peer = tmp_path / "peer"
    for seed, dice in enumerate([0.839, 0.842, 0.836]):
        _result(peer, f"f10_s{seed}", fraction=10, seed=seed, dice=dice)
    _result(peer, "f5_s1", fraction=5, seed=1, dice=0.83)
    rows = peer_summary.summary_rows(peer_summary.peer_runs(peer),
                                     peer_summary.medssl_values(_csv(tmp_path / "c.csv"), "scratch"))
    assert [(r["fraction"], r["nnunet"].n) for r in rows] == [(5.0, 1), (10.0, 3)]
    ten = rows[1]
    assert ten["nnunet"].mean == pytest.approx(0.839) and ten["medssl"].values == (0.8552, 0.8502, 0.8535)
    want = mean_ci([0.8552 - 0.839, 0.8502 - 0.842, 0.8535 - 0.836])
    assert ten["paired"].mean == pytest.approx(want.mean) and ten["paired"].half_width == pytest.approx(want.half_width)
    assert ten["paired"].signs == (3, 0)
    five = rows[0]  # only seed 1 in common: a difference without CI; medssl's own summary keeps its 3 seeds
    assert five["paired"].seeds == (1,) and five["paired"].half_width is None and five["medssl"].n == 3
    table = peer_summary.markdown(rows, "scratch", "dice_mean")
    assert "| 10 % | cpu | planner (batch 2), 1125 it. |" in table and "(3+ 0−, CI " in table
    assert "1: 0.8300" in table and "+0.0153 (1+ 0−)" in table and "0.8442 ± 0.0050 (n=3)" in table


def test_groups_keep_budgets_and_devices_apart_and_refuse_a_double_seed(tmp_path: Path) -> None:
    peer = tmp_path / "peer"
    _result(peer, "a", fraction=10, seed=0, dice=0.84)
    _result(peer, "b", fraction=10, seed=0, dice=0.85, iterations=500)
    _result(peer, "c", fraction=10, seed=0, dice=0.86, device="cuda")
    _result(peer, "d", fraction=10, seed=0, dice=0.83, tta=False)
    groups = peer_summary.peer_results(peer)
    assert len(groups) == 4 and all(list(v) == [0] for v in groups.values())
    _result(peer, "e", fraction=10, seed=0, dice=0.80)
    with pytest.raises(MedsslError, match=r"e/.*a.* are both seed 0|a.* and .*e.* are both seed 0"):
        peer_summary.peer_results(peer)


def test_given_values_override_the_csv_and_bad_inputs_are_named(tmp_path: Path) -> None:
    got = peer_summary.medssl_values(_csv(tmp_path / "c.csv"), "scratch", ["10:1=0.9", "25:0=0.86"])
    assert got[10.0] == {0: 0.8552, 1: 0.9, 2: 0.8535} and got[25.0] == {0: 0.86}
    assert peer_summary.medssl_values(None, "scratch", ["5:2=0.8419"]) == {5.0: {2: 0.8419}}
    with pytest.raises(MedsslError, match="FRACTION:SEED=VALUE"):
        peer_summary.medssl_values(None, "scratch", ["10=0.8"])
    (tmp_path / "old.csv").write_text("fraction,init,n,seeds\n10.0,scratch,1,0\n")
    with pytest.raises(MedsslError, match="no per-seed 'values' column"):
        peer_summary.medssl_values(tmp_path / "old.csv", "scratch")
    (tmp_path / "short.csv").write_text("fraction,init,seeds,values\n10.0,scratch,0 1,0.85\n")
    with pytest.raises(MedsslError, match="scratch at 10.0 % lists 2 seeds but 1 values"):
        peer_summary.medssl_values(tmp_path / "short.csv", "scratch")
    with pytest.raises(MedsslError, match="no \\*/result.json under"):
        peer_summary.peer_results(tmp_path / "empty")
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "result.json").write_text(json.dumps({"fraction": 10, "seed": 0}))
    with pytest.raises(MedsslError, match=r"x/result.json: not a peer_nnunet result with metrics.dice_mean"):
        peer_summary.peer_results(tmp_path / "bad")


def test_cli_prints_the_table_and_exits_1_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peer = tmp_path / "peer"
    _result(peer, "f10_s0", fraction=10, seed=0, dice=0.839)
    assert peer_summary.main([str(peer), "--medssl", "10:0=0.8552"]) == 0
    out = capsys.readouterr().out
    assert "| 0.8390 (n=1, no CI) | 0: 0.8390 |" in out and "+0.0162 (1+ 0−)" in out
    assert peer_summary.main([str(tmp_path / "nothing")]) == 1
    assert "no */result.json" in capsys.readouterr().err


def test_seeds_given_one_budget_group_together_though_their_iterations_differ(tmp_path: Path) -> None:
    """Each run's probe times its own machine, so seeds of one ``--match-medssl`` or ``--minutes`` budget come to
    different iteration counts: they are still one group (averaged over seeds), with the iterations listed per seed;
    a matched budget never mixes with a fixed-minutes one."""
    peer = tmp_path / "peer"
    for seed, (dice, minutes, its) in enumerate([(0.84, 54.6, 2870), (0.85, 55.1, 2905), (0.83, 53.9, 2810)]):
        _result(peer, f"m{seed}", fraction=5, seed=seed, dice=dice, minutes=minutes, iterations=its, matched=True)
    _result(peer, "t0", fraction=5, seed=0, dice=0.82, minutes=20, iterations=1122)
    _result(peer, "t1", fraction=5, seed=1, dice=0.81, minutes=20, iterations=1125)
    runs = peer_summary.peer_runs(peer)
    assert sorted(k[3] for k in runs) == ["20 min", "equal compute"]
    rows = peer_summary.summary_rows(runs, {5.0: {0: 0.85, 1: 0.86, 2: 0.84}})
    matched = next(r for r in rows if r["budget"] == "equal compute")
    assert matched["nnunet"].n == 3 and matched["paired"].mean == pytest.approx(0.01)
    assert matched["iterations"] == {0: 2870, 1: 2905, 2: 2810}
    table = peer_summary.markdown(rows, "scratch", "dice_mean")
    assert "equal compute (0: 54.6 min / 2,870 it., 1: 55.1 min / 2,905 it., 2: 53.9 min / 2,810 it.)" in table
    assert "20 min (0: 20 min / 1,122 it., 1: 20 min / 1,125 it.)" in table
    assert peer_summary.budget_label({"iterations": 500}) == "500 it."
