"""The labels-needed headline (medssl/tracking/efficiency.py) and its place in ``medssl compare``."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.tracking.compare import compare_study
from medssl.tracking.efficiency import efficiency_metrics, label_efficiency, lower_is_better
from medssl.tracking.stats import mean_ci
from tests.tracking.test_compare import Study, _cli

FRACS = (5.0, 10.0, 25.0, 100.0)


def _summaries(curves: dict[str, list[float]], spread: float = 0.002) -> dict:
    """Three seeds per cell around each given mean."""
    return {(f, init): mean_ci([m - spread, m, m + spread]) for init, ms in curves.items() for f, m in zip(FRACS, ms, strict=True)}


def test_docstring_example_ssl_needs_ten_times_fewer_labels() -> None:
    s = _summaries({"scratch": [0.846, 0.855, 0.862, 0.870], "ssl": [0.858, 0.866, 0.869, 0.871]})
    eff = label_efficiency(s, "test_dice_mean", within=0.005)
    assert eff.goal == pytest.approx(0.865) and eff.goal_source == "scratch at 100 % − 0.005"
    assert eff.needed == {"scratch": 100.0, "ssl": 10.0} and eff.saving == pytest.approx(10.0)
    assert eff.at_needed["ssl"].mean == pytest.approx(0.866)
    text = eff.sentence()
    assert "ssl needs 10 % of the labels (0.866 ±" in text and "10× fewer labels with SSL" in text
    assert "[measured at 5, 10, 25, 100 %]" in text
    assert efficiency_metrics(eff) == pytest.approx({
        "test_dice_mean/goal": 0.865, "test_dice_mean/labels_needed_scratch": 100.0,
        "test_dice_mean/labels_needed_ssl": 10.0, "test_dice_mean/label_saving": 10.0,
    })


def test_the_paired_difference_at_the_deciding_fraction_says_whether_it_is_noise() -> None:
    s = _summaries({"scratch": [0.846, 0.855, 0.862, 0.870], "ssl": [0.858, 0.866, 0.869, 0.871]})
    noisy = {10.0: mean_ci([0.03, -0.01, 0.013]), 100.0: mean_ci([0.001, 0.0, 0.002])}
    eff = label_efficiency(s, "test_dice_mean", within=0.005, paired=noisy)
    assert eff.paired == (10.0, noisy[10.0])
    assert "; paired SSL − scratch at 10 %: 0.011 ± " in eff.sentence()
    assert "(CI includes 0: within seed noise)" in eff.sentence()
    firm = label_efficiency(s, "test_dice_mean", within=0.005, paired={10.0: mean_ci([0.010, 0.011, 0.012])})
    assert "(CI above 0)" in firm.sentence() and "within seed noise" not in firm.sentence()
    one = label_efficiency(s, "test_dice_mean", within=0.005, paired={10.0: mean_ci([0.01])})
    assert "at 10 %: 0.010 (n=1, no CI) [measured" in one.sentence()  # said once
    assert label_efficiency(s, "test_dice_mean", within=0.005, paired={25.0: noisy[10.0]}).paired is None


def test_a_lucky_small_fraction_contradicted_by_the_next_does_not_count() -> None:
    s = _summaries({"scratch": [0.80, 0.82, 0.85, 0.87], "ssl": [0.87, 0.84, 0.86, 0.87]})
    eff = label_efficiency(s, "test_dice_mean", within=0.01)  # goal 0.86: SSL meets it at 5 %, not at 10 %
    assert eff.needed == {"scratch": 100.0, "ssl": 25.0} and eff.saving == pytest.approx(4.0)


def test_no_gain_and_not_reached_are_said_plainly() -> None:
    same = label_efficiency(_summaries({"scratch": [0.84, 0.85, 0.86, 0.87], "ssl": [0.84, 0.85, 0.86, 0.87]}),
                            "test_dice_mean")
    assert same.needed == {"scratch": 100.0, "ssl": 100.0} and "SSL saves no labels" in same.sentence()
    worse = label_efficiency(_summaries({"scratch": [0.86, 0.87, 0.87, 0.87], "ssl": [0.80, 0.82, 0.83, 0.84]}),
                             "test_dice_mean", target=0.85)
    assert worse.goal_source == "given 0.85" and worse.needed == {"scratch": 5.0, "ssl": None}
    assert worse.saving is None and "ssl does not reach it at any measured fraction" in worse.sentence()
    assert ": no label saving with SSL" in worse.sentence() and "SSL does not reach it" not in worse.sentence()
    assert efficiency_metrics(worse) == pytest.approx({"test_dice_mean/goal": 0.85,
                                                       "test_dice_mean/labels_needed_scratch": 5.0})
    more = label_efficiency(_summaries({"scratch": [0.86, 0.87, 0.87, 0.87], "ssl": [0.80, 0.87, 0.87, 0.87]}),
                            "test_dice_mean", within=0.01)
    assert more.saving == pytest.approx(0.5) and "SSL needs 2× more labels" in more.sentence()


def test_lower_is_better_metrics_reverse_the_goal() -> None:
    assert lower_is_better("test_hd95_mean") and not lower_is_better("test_auc")
    s = _summaries({"scratch": [4.0, 3.0, 2.5, 2.0], "ssl": [2.9, 2.2, 2.1, 2.0]})
    eff = label_efficiency(s, "test_hd95_mean", within=0.25)
    assert eff.goal == pytest.approx(2.25) and eff.lower_better
    assert eff.needed == {"scratch": 100.0, "ssl": 10.0} and "test_hd95_mean ≤ 2.25" in eff.sentence()


def test_bad_arguments_and_no_reference() -> None:
    s = _summaries({"ssl": [0.8, 0.8, 0.8, 0.8]})
    assert label_efficiency(s, "test_dice_mean") is None  # nothing to aim at without scratch or a target
    assert label_efficiency(s, "test_dice_mean", target=0.8).needed == {"ssl": 5.0}
    with pytest.raises(ValueError, match="within must be a finite tolerance"):
        label_efficiency(s, "test_dice_mean", within=-0.01)
    with pytest.raises(ValueError, match="target must be a finite"):
        label_efficiency(s, "test_dice_mean", target=float("nan"))


def test_compare_prints_logs_and_returns_the_headline(tmp_path: Path) -> None:
    st = Study(tmp_path)
    for seed in (0, 1, 2):
        for f, sc, ss in ((10, 0.80, 0.86), (50, 0.84, 0.87), (100, 0.87, 0.875)):
            st.child(f, "scratch", seed, sc + 0.001 * seed)
            st.child(f, "ssl", seed, ss + 0.001 * seed)
    out = compare_study("hand", tracking_uri=st.uri, out_dir=tmp_path / "o", within=0.01)
    assert out.efficiency.needed == {"scratch": 100.0, "ssl": 10.0}
    logged = st.client.get_run(st.parent).data.metrics
    assert logged["test_dice_mean/labels_needed_ssl"] == 10.0 and logged["test_dice_mean/label_saving"] == 10.0
    res = _cli(st, tmp_path / "c", "--within", "0.01")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Labels needed:" in text and "10× fewer labels with SSL" in text
    assert "paired SSL − scratch at 10 %: 0.060 ± 0.000 (CI above 0) [measured at 10, 50, 100 %]" in text
    bad = _cli(st, tmp_path / "c", "--within", "-1")
    assert bad.exit_code == 1 and "within must be a finite tolerance" in bad.output
