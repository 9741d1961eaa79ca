"""A study's headline number: the share of the labels each init needs to reach a Dice / AUC ("with SSL we need
N % of the labels for this Dice").

Read from the per-(fraction, init) summaries of :func:`medssl.tracking.compare.summarise`, at the **measured
fractions only** (no interpolation between them). Definitions:

- **goal**: ``target`` if given, else the from-scratch mean at the study's largest fraction (usually 100 %),
  minus ``within`` (a tolerance in metric units: "within 0.01 Dice of full-label scratch"); for a metric where
  lower is better (HD95, losses) plus ``within`` and the comparisons reversed.
- **labels needed** by an init: the smallest measured fraction ``f`` whose mean over seeds meets the goal *at
  ``f`` and at every larger measured fraction* (a lucky dip at a small fraction that the next one contradicts
  does not count); ``None`` when no fraction does.
- **label saving**: scratch's fraction / SSL's (``2.5`` = SSL needs 2.5× fewer labels); ``None`` unless both
  reach the goal.

Example: scratch 0.846 / 0.855 / 0.862 / 0.870 and SSL 0.858 / 0.866 / 0.869 / 0.871 at 5 / 10 / 25 / 100 %,
``within=0.005`` → goal 0.865: scratch needs 100 %, SSL 10 %, saving 10×. The sentence names the seeds and the
CI at the deciding fraction, so a reader sees how firm the number is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from medssl.tracking.stats import Summary, format_summary

__all__ = ["LabelEfficiency", "label_efficiency", "lower_is_better", "efficiency_metrics"]

#: metric name parts for which smaller values are better (everything else: larger is better)
_LOWER_BETTER = ("hd95", "hausdorff", "loss", "error", "missed", "surface_distance", "asd")


def lower_is_better(metric: str) -> bool:
    """``True`` for distances / losses / error counts (``test_hd95_mean``), ``False`` for Dice, AUC, accuracy."""
    name = metric.lower()
    return any(part in name for part in _LOWER_BETTER)


@dataclass(frozen=True)
class LabelEfficiency:
    """How many labels each init needs to reach ``goal`` (see the module docstring).

    Attributes:
        metric: the compared metric, e.g. ``test_dice_mean``.
        goal: the value to reach (metric units).
        goal_source: how the goal was set, e.g. ``"scratch at 100 % − 0.005"`` or ``"given 0.86"``.
        fractions: the measured label fractions (percent), ascending.
        needed: init → smallest fraction (percent) that meets the goal from there on, or ``None``.
        at_needed: init → the :class:`Summary` at that fraction (``None`` where not reached).
        saving: scratch's fraction / SSL's, or ``None`` unless both reach the goal.
        lower_better: whether smaller values of ``metric`` are better.
        paired: ``(fraction, Summary)`` of the paired SSL − scratch difference at the smaller of the two
            fractions needed (where the verdict is decided), if the study has it; the sentence says whether its CI
            excludes 0, so a saving within seed noise reads as such.
    """

    metric: str
    goal: float
    goal_source: str
    fractions: tuple[float, ...]
    needed: dict[str, float | None] = field(default_factory=dict)
    at_needed: dict[str, Summary | None] = field(default_factory=dict)
    saving: float | None = None
    lower_better: bool = False
    paired: tuple[float, Summary] | None = None

    def sentence(self) -> str:
        """One line for the console and reports, e.g. ``"test_dice_mean ≥ 0.865 (scratch at 100 % − 0.005):
        scratch needs 100 % of the labels (0.870 ± 0.004, n=3), ssl needs 10 % (0.866 ± 0.006, n=3): 10× fewer
        labels with SSL [measured at 5, 10, 25, 100 %]"``."""
        op = "≤" if self.lower_better else "≥"
        parts = []
        for init, f in self.needed.items():
            s = self.at_needed.get(init)
            parts.append(
                f"{init} needs {f:g} % of the labels ({format_summary(s)})"
                if f is not None
                else f"{init} does not reach it at any measured fraction"
            )
        if self.saving is not None:
            verdict = (
                f"{self.saving:.3g}× fewer labels with SSL" if self.saving > 1
                else "SSL saves no labels" if self.saving == 1 else f"SSL needs {1 / self.saving:.3g}× more labels"
            )
        elif self.needed.get("ssl") is not None:
            verdict = "only SSL reaches it"
        else:
            verdict = "no label saving with SSL" if "ssl" in self.needed else "no SSL arm"
        if self.paired is not None:
            f, d = self.paired
            ci = (
                "" if d.low is None or d.high is None  # format_summary says "(n=1, no CI)"
                else " (CI includes 0: within seed noise)" if d.low <= 0 <= d.high
                else f" (CI {'above' if d.low > 0 else 'below'} 0)"
            )
            verdict += f"; paired SSL − scratch at {f:g} %: {format_summary(d)}{ci}"
        measured = ", ".join(f"{f:g}" for f in self.fractions)
        return (
            f"{self.metric} {op} {self.goal:.4g} ({self.goal_source}): {', '.join(parts)}: {verdict} "
            f"[measured at {measured} %]"
        )


def _meets(value: float, goal: float, lower_better: bool) -> bool:
    return value <= goal if lower_better else value >= goal


def label_efficiency(
    summaries: dict[tuple[float, str], Summary],
    metric: str,
    *,
    target: float | None = None,
    within: float = 0.0,
    reference: str = "scratch",
    paired: dict[float, Summary] | None = None,
) -> LabelEfficiency | None:
    """Labels needed per init to reach a goal (module docstring).

    Args:
        summaries: ``(fraction %, init) → Summary`` of the inits only (no paired-difference cells).
        metric: the metric's name (its direction: :func:`lower_is_better`).
        target: the value to reach; ``None``: ``reference``'s mean at its largest measured fraction.
        within: tolerance in metric units (≥ 0) subtracted from (or, lower-better, added to) the target.
        reference: the init whose largest-fraction mean is the default target.
        paired: fraction → paired SSL − scratch :class:`Summary` (``compare``'s difference rows), for the
            sentence's noise check at the deciding fraction.

    Returns:
        ``None`` when no target can be set (no ``reference`` cell and no ``target``).

    Raises:
        ValueError: ``within`` negative or not finite, ``target`` not finite.
    """
    if not math.isfinite(within) or within < 0:
        raise ValueError(f"within must be a finite tolerance >= 0 (metric units), got {within}")
    if target is not None and not math.isfinite(target):
        raise ValueError(f"target must be a finite {metric} value, got {target}")
    lower = lower_is_better(metric)
    inits = sorted({i for _, i in summaries})
    fractions = tuple(sorted({f for f, _ in summaries}))
    if target is None:
        ref = [f for f in fractions if (f, reference) in summaries]
        if not ref:
            return None
        target, source = summaries[(ref[-1], reference)].mean, f"{reference} at {ref[-1]:g} %"
    else:
        source = f"given {target:.4g}"
    if within:
        source += f" {'+' if lower else '−'} {within:g}"
    goal = target + within if lower else target - within
    needed: dict[str, float | None] = {}
    at: dict[str, Summary | None] = {}
    for init in inits:
        have = [f for f in fractions if (f, init) in summaries]
        ok = [_meets(summaries[(f, init)].mean, goal, lower) for f in have]
        first = next((have[k] for k in range(len(have)) if all(ok[k:])), None)
        needed[init], at[init] = first, summaries.get((first, init)) if first is not None else None
    a, b = needed.get(reference), needed.get("ssl")
    saving = a / b if a is not None and b is not None and reference != "ssl" else None
    decided = [f for f in (a, b) if f is not None]
    at_f = min(decided) if decided else None
    pair = (at_f, paired[at_f]) if paired and at_f is not None and at_f in paired else None
    return LabelEfficiency(metric, goal, source, fractions, needed, at, saving, lower, pair)


def efficiency_metrics(eff: LabelEfficiency | None) -> dict[str, float]:
    """Flat MLflow metrics for the parent run: ``<metric>/goal``, ``<metric>/labels_needed_<arm>`` (percent;
    absent where not reached; ``+`` of a student arm as ``_``) and ``<metric>/label_saving``."""
    if eff is None:
        return {}
    out = {f"{eff.metric}/goal": eff.goal}
    # an arm name in an MLflow metric name: "scratch+st" → "scratch_st" ("+" is not allowed there)
    out |= {f"{eff.metric}/labels_needed_{i.replace('+', '_')}": f for i, f in eff.needed.items() if f is not None}
    if eff.saving is not None:
        out[f"{eff.metric}/label_saving"] = eff.saving
    return out
