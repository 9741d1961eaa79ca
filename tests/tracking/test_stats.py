from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from medssl.tracking.stats import format_summary, mean_ci, paired_difference


def test_mean_ci_matches_hand_computation() -> None:
    s = mean_ci([0.80, 0.82, 0.84], seeds=[0, 1, 2])
    # mean 0.82, s = 0.02, t(0.975, 2) = 4.302652729911275
    assert s.n == 3 and s.mean == pytest.approx(0.82)
    assert s.std == pytest.approx(0.02)
    assert s.half_width == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert s.low == pytest.approx(0.82 - s.half_width) and s.high == pytest.approx(0.82 + s.half_width)
    assert s.seeds == (0, 1, 2)


def test_mean_ci_agrees_with_scipy_interval_and_other_levels() -> None:
    vals = [0.71, 0.65, 0.9, 0.77, 0.69]
    lo, hi = sps.t.interval(0.9, len(vals) - 1, loc=sps.tmean(vals), scale=sps.sem(vals))
    s = mean_ci(vals, confidence=0.9)
    assert (s.low, s.high) == (pytest.approx(lo), pytest.approx(hi))
    # two values: t(0.975, 1) = 12.706204736174698, s = |a - b| / sqrt(2)
    s2 = mean_ci([1.0, 2.0])
    assert s2.half_width == pytest.approx(12.706204736174698 * (1 / math.sqrt(2)) / math.sqrt(2))


def test_single_value_has_no_interval() -> None:
    s = mean_ci([0.5])
    assert s.n == 1 and s.mean == 0.5 and s.std is None and s.half_width is None
    assert s.low is None and s.high is None
    assert format_summary(s) == "0.500 (n=1, no CI)"


@pytest.mark.parametrize("bad", [[], [float("nan")], [1.0, float("inf")]])
def test_bad_values_raise(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        mean_ci(bad)


def test_bad_confidence_raises() -> None:
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_paired_difference_uses_matching_seeds_only() -> None:
    ssl = {0: 0.85, 1: 0.80, 2: 0.90, 7: 0.1}
    scratch = {0: 0.80, 1: 0.78, 2: 0.83, 5: 0.99}
    d = paired_difference(ssl, scratch)
    diffs = [0.05, 0.02, 0.07]  # seeds 0, 1, 2
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d is not None and d.seeds == (0, 1, 2) and d.n == 3
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(sd)
    assert d.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    # pairing: a constant per-seed offset gives a zero-width interval of the difference
    same = paired_difference({0: 0.5, 1: 0.9}, {0: 0.4, 1: 0.8})
    assert same is not None and same.mean == pytest.approx(0.1) and same.half_width == pytest.approx(0.0)


def test_paired_difference_skips_non_finite_seeds() -> None:
    ssl = {0: 0.85, 1: float("nan"), 2: 0.90, 3: 0.7}
    scratch = {0: 0.80, 1: 0.78, 2: float("inf"), 3: 0.6, 4: 0.5}
    d = paired_difference(ssl, scratch)
    assert d is not None and d.seeds == (0, 3) and d.n == 2 and d.mean == pytest.approx(0.075)
    assert paired_difference({0: float("nan")}, {0: 0.5}) is None


def test_paired_difference_without_common_seed() -> None:
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({3: 0.9}, {3: 0.7})
    assert one is not None and one.n == 1 and one.half_width is None and one.mean == pytest.approx(0.2)


def test_format_summary() -> None:
    assert format_summary(mean_ci([0.80, 0.82, 0.84]), digits=2) == "0.82 ± 0.05"
    assert format_summary(None) == "–"
