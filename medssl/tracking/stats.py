"""Small-sample statistics for label-efficiency studies: mean ± Student-t confidence interval over seeds and
the paired SSL − scratch difference over matching seeds.

All functions are pure (numbers in, numbers out). With n seeds the interval is
``mean ± t_{1-α/2, n-1} · s / √n`` (``s`` the sample standard deviation, ``ddof=1``). Example: values
``[0.80, 0.82, 0.84]`` → mean 0.82, s = 0.02, t_{0.975, 2} = 4.303 → half-width 4.303 · 0.02 / √3 = 0.0497.
One seed gives a mean but no interval (shown as ``"n=1, no CI"``). NaN / ``inf`` values are never averaged:
:func:`mean_ci` refuses them, :func:`paired_difference` drops the seeds where either arm has one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Summary", "mean_ci", "paired_difference", "format_summary"]


@dataclass(frozen=True)
class Summary:
    """Mean and confidence interval of ``n`` values.

    Attributes:
        n: number of values.
        mean: arithmetic mean.
        std: sample standard deviation (``ddof=1``); ``None`` for n = 1.
        half_width: CI half-width ``t · std / √n``; ``None`` for n = 1 (undefined).
        confidence: the CI level, e.g. 0.95.
        seeds: the seeds the values came from (paired differences: the matched seeds), if known.
        values: the values themselves, in the order of ``seeds`` (paired: the per-seed differences).
    """

    n: int
    mean: float
    std: float | None
    half_width: float | None
    confidence: float = 0.95
    seeds: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    @property
    def signs(self) -> tuple[int, int]:
        """``(above 0, below 0)``: how many values are positive / negative (for a paired difference: on how
        many seeds the treated arm is ahead / behind; zeros count in neither)."""
        return sum(v > 0 for v in self.values), sum(v < 0 for v in self.values)

    @property
    def low(self) -> float | None:
        """Lower CI bound, ``None`` when undefined."""
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        """Upper CI bound, ``None`` when undefined."""
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95, seeds: Sequence[int] = ()) -> Summary:
    """Mean ± Student-t confidence interval of ``values`` (one per seed).

    Args:
        values: finite numbers, at least one.
        confidence: CI level in (0, 1).
        seeds: optional seeds of the values (kept in the summary).

    Returns:
        A :class:`Summary`; ``std``/``half_width`` are ``None`` for a single value.

    Raises:
        ValueError: no values, a non-finite value, or ``confidence`` outside (0, 1).
    """
    from scipy.stats import t

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_ci got non-finite values: {vals}")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n == 1:
        return Summary(1, mean, None, None, confidence, tuple(int(s) for s in seeds), tuple(vals))
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, half, confidence, tuple(int(s) for s in seeds), tuple(vals))


def paired_difference(
    treated: Mapping[int, float | None], control: Mapping[int, float | None], confidence: float = 0.95
) -> Summary | None:
    """Mean ± CI of the per-seed differences ``treated[s] − control[s]`` over the seeds present in both
    with finite values (a NaN / ``inf`` / ``None`` in either arm drops that seed).

    Pairing removes the between-seed variance shared by both arms (same split, same validation set), so
    the interval of the difference is usually much narrower than the two separate intervals suggest.

    Args:
        treated: seed → metric (e.g. SSL init).
        control: seed → metric (e.g. scratch).
        confidence: CI level.

    Returns:
        The :class:`Summary` of the differences (``seeds`` = matched seeds, sorted, ``n`` their number), or
        ``None`` when no seed is finite in both.
    """

    def finite(x: float | None) -> bool:
        return x is not None and math.isfinite(x)

    common = sorted(s for s in set(treated) & set(control) if finite(treated[s]) and finite(control[s]))
    if not common:
        return None
    return mean_ci([treated[s] - control[s] for s in common], confidence, seeds=common)


def format_summary(s: Summary | None, digits: int = 3) -> str:
    """``"0.820 ± 0.050"``, ``"0.820 (n=1, no CI)"`` or ``"–"`` for ``None`` (no finite value)."""
    if s is None:
        return "–"
    if s.half_width is None:
        return f"{s.mean:.{digits}f} (n={s.n}, no CI)"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"
