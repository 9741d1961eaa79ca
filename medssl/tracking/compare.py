"""``medssl compare``: read a study's child runs from MLflow, summarise a metric per label fraction and init
(mean ± 95 % CI over seeds) plus the paired SSL − scratch difference, and write a rich table, a CSV and a
PNG curve (metric vs label fraction, log x axis, CI bands), logged back to the study's parent run.

Runs are found by tags only: the parent has ``medssl.kind = sweep`` and ``medssl.study``; its children carry
``medssl.fraction`` / ``medssl.init`` / ``medssl.seed`` / ``medssl.config_hash`` (see :mod:`medssl.engines.studies.pipeline`).
Which children count is :mod:`medssl.tracking.compare_select` (FINISHED only, one per key, one config per
cell). A child whose metric is missing or non-finite (e.g. AUC of a single-class test set) is counted, not
averaged: every cell reports ``n`` (finite values) and how many were missing / non-finite; paired
differences use only the seeds finite in both arms. The per-fraction summary is also logged as metrics on
the parent run (:func:`summary_metrics`), so studies can be compared in the MLflow UI.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from medssl.errors import MedsslError
from medssl.tracking.compare_select import (
    child_runs,
    collect_records,
    find_study_runs,
    known_studies,
    machine_note,
)
from medssl.tracking.efficiency import LabelEfficiency, efficiency_metrics, label_efficiency
from medssl.tracking.mlflow_tracker import default_tracking_uri, make_client
from medssl.tracking.stats import Summary, format_summary, mean_ci, paired_difference

__all__ = [
    "CompareResult",
    "Cell",
    "compare_study",
    "find_study_runs",
    "child_runs",
    "collect_records",
    "summarise",
    "cell_counts",
    "summary_metrics",
    "build_table",
    "write_csv",
    "plot_curve",
    "DIFF",
    "diff_name",
    "is_diff",
]

log = logging.getLogger(__name__)

#: the init name of the paired SSL − scratch difference rows
DIFF = "ssl-scratch"
#: the arm every paired difference is taken against
REFERENCE = "scratch"


def diff_name(arm: str) -> str:
    """The row name of ``arm``'s paired difference to scratch: ``"ssl"`` → ``"ssl-scratch"`` (:data:`DIFF`),
    ``"ssl+st"`` (SSL init + self-training) → ``"ssl+st-scratch"``."""
    return f"{arm}-{REFERENCE}"


def is_diff(init: str) -> bool:
    """``init`` names a paired-difference row (:func:`diff_name`), not an arm."""
    return init.endswith(f"-{REFERENCE}")


def _arms(keys: Any) -> list[str]:
    """The arms other than scratch, in table order: ``ssl`` first, then the rest sorted."""
    arms = {i for _, i in keys if i != REFERENCE and not is_diff(i)}
    return sorted(arms, key=lambda a: (a != "ssl", a))


@dataclass(frozen=True)
class Cell:
    """What one (fraction, init) cell is made of.

    Attributes:
        n: finite values averaged (for a paired difference, :func:`diff_name`: seeds finite in both arms).
        missing: children of the cell that did not log the metric.
        nonfinite: children whose value is NaN / ``inf`` (e.g. AUC of a single-class test set).
        config_hash: the ``medssl.config_hash`` of the cell's children (``""`` for a paired difference).
    """

    n: int
    missing: int = 0
    nonfinite: int = 0
    config_hash: str = ""

    def note(self) -> str:
        """``"2"``, ``"2 (1 missing, 1 NaN)"``: the table's n cell."""
        extra = [f"{k} {w}" for k, w in ((self.missing, "missing"), (self.nonfinite, "NaN")) if k]
        return f"{self.n} ({', '.join(extra)})" if extra else str(self.n)


@dataclass
class CompareResult:
    """Output of :func:`compare_study`.

    Attributes:
        records: one dict per used child run (see :func:`collect_records`): ``fraction`` (percent), ``init``,
            ``seed``, ``value`` (NaN unless ``status == "ok"``), ``status``, ``run_id``, ``config_hash``.
        rows: one dict per (fraction, init ∈ inits ∪ their paired differences to scratch, ``"ssl-scratch"`` …): ``n``, ``missing``,
            ``nonfinite``, ``mean``, ``std``, ``ci_low``, ``ci_high`` (``None`` where undefined), ``seeds``,
            ``values`` (per seed, in the order of ``seeds``), ``config_hash`` — the CSV rows.
        summaries: ``(fraction, init) → Summary`` of the cells with at least one finite value.
        cells: ``(fraction, init) → Cell`` of every cell (also those with n = 0).
        parent_metrics: the summary metrics logged on the parent run (:func:`summary_metrics` and
            :func:`~medssl.tracking.efficiency.efficiency_metrics`).
        efficiency: the labels each init needs to reach the goal (:mod:`medssl.tracking.efficiency`).
        machine_note: set when the used runs ran on more than one kind of machine
            (:func:`~medssl.tracking.compare_select.machine_note`), else ``None``.
    """

    study: str
    metric: str
    parent_run_id: str
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    table: Table
    csv_path: Path
    png_path: Path
    summaries: dict[tuple[float, str], Summary] = field(default_factory=dict)
    cells: dict[tuple[float, str], Cell] = field(default_factory=dict)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    efficiency: LabelEfficiency | None = None
    machine_note: str | None = None


def _ok(records: list[dict[str, Any]]) -> dict[tuple[float, str], dict[int, float]]:
    by: dict[tuple[float, str], dict[int, float]] = {}
    for r in records:
        vals = by.setdefault((r["fraction"], r["init"]), {})
        if r.get("status", "ok") == "ok":
            vals[r["seed"]] = r["value"]
    return by


def summarise(records: list[dict[str, Any]], confidence: float = 0.95) -> dict[tuple[float, str], Summary]:
    """``(fraction, init) → Summary`` over the seeds with a finite value, plus ``(fraction, diff_name(arm))``
    paired differences to scratch (``"ssl-scratch"``, ``"ssl+st-scratch"`` …) over the seeds finite in both arms.
    Cells without a finite value are left out."""
    by = _ok(records)
    out: dict[tuple[float, str], Summary] = {}
    for (frac, init), vals in sorted(by.items()):
        if vals:
            seeds = sorted(vals)
            out[(frac, init)] = mean_ci([vals[s] for s in seeds], confidence, seeds=seeds)
    for frac in sorted({f for f, _ in by}):
        for arm in _arms(by):
            if (frac, arm) in by and (frac, REFERENCE) in by:
                d = paired_difference(by[(frac, arm)], by[(frac, REFERENCE)], confidence)
                if d is not None:
                    out[(frac, diff_name(arm))] = d
    return out


def cell_counts(records: list[dict[str, Any]]) -> dict[tuple[float, str], Cell]:
    """``(fraction, init) → Cell`` for every cell with a child, plus the paired-difference cells
    (:func:`diff_name`)."""
    out: dict[tuple[float, str], Cell] = {}
    for key in sorted({(r["fraction"], r["init"]) for r in records}):
        rs = [r for r in records if (r["fraction"], r["init"]) == key]
        status = [r.get("status", "ok") for r in rs]
        hashes = sorted({str(r.get("config_hash", "")) for r in rs})
        out[key] = Cell(
            status.count("ok"), status.count("missing"), status.count("nonfinite"), ",".join(hashes)
        )
    by = _ok(records)
    for frac in sorted({f for f, _ in out}):
        for arm in _arms(out):
            if (frac, arm) in out and (frac, REFERENCE) in out:
                out[(frac, diff_name(arm))] = Cell(len(set(by[(frac, arm)]) & set(by[(frac, REFERENCE)])))
    return out


def _name(x: str) -> str:
    """MLflow-safe metric name part: letters, digits, ``_ - . /`` kept, anything else → ``_``."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in x)


def _arm_name(arm: str) -> str:
    """An arm in a metric name: ``ssl+st`` → ``ssl_st``."""
    return _name(arm.replace("+", "_"))


def summary_metrics(
    summaries: dict[tuple[float, str], Summary], cells: dict[tuple[float, str], Cell], metric: str
) -> dict[str, float]:
    """Per-fraction summary as flat MLflow metrics for the study's parent run.

    Names: ``<metric>/f<fraction>_<arm>_<stat>`` with the fraction's ``.`` as ``_`` (12.5 % → ``f12_5``),
    ``<arm>`` an init (``ssl``, ``scratch``, ``ssl_st`` for ``ssl+st``), ``delta`` (paired SSL − scratch) or
    ``delta_<arm>`` (another arm's paired difference to scratch, e.g. ``delta_scratch_st``); stats ``mean``, ``ci_low``,
    ``ci_high`` (only where a CI exists, n ≥ 2), ``n`` (finite values / matched pairs) and, for inits,
    ``missing`` (children without a finite value). E.g. ``test_dice_mean/f10_ssl_mean``,
    ``test_dice_mean/f10_delta_ci_low``.
    """
    out: dict[str, float] = {}
    for (frac, init), cell in sorted(cells.items()):
        if init == DIFF:
            arm = "delta"
        elif is_diff(init):
            arm = "delta_" + _arm_name(init.removesuffix(f"-{REFERENCE}"))
        else:
            arm = _arm_name(init)
        prefix = f"{_name(metric)}/f{frac:g}".replace(".", "_") + f"_{arm}_"
        out[prefix + "n"] = float(cell.n)
        if not is_diff(init):
            out[prefix + "missing"] = float(cell.missing + cell.nonfinite)
        s = summaries.get((frac, init))
        if s is not None:
            out[prefix + "mean"] = s.mean
            if s.low is not None and s.high is not None:
                out[prefix + "ci_low"], out[prefix + "ci_high"] = s.low, s.high
    return out


def _rows(
    summaries: dict[tuple[float, str], Summary], cells: dict[tuple[float, str], Cell]
) -> list[dict[str, Any]]:
    rows = []
    for key, c in cells.items():
        s = summaries.get(key)
        rows.append(
            {
                "fraction": key[0],
                "init": key[1],
                "n": c.n,
                "missing": c.missing,
                "nonfinite": c.nonfinite,
                "mean": s.mean if s else None,
                "std": s.std if s else None,
                "ci_low": s.low if s else None,
                "ci_high": s.high if s else None,
                "seeds": " ".join(str(x) for x in s.seeds) if s else "",
                "values": " ".join(f"{v:.6g}" for v in s.values) if s else "",
                "config_hash": c.config_hash,
            }
        )
    return rows


def build_table(
    summaries: dict[tuple[float, str], Summary],
    study: str,
    metric: str,
    cells: dict[tuple[float, str], Cell] | None = None,
) -> Table:
    """Rich table: a row per fraction; per init ``n`` (+ missing / NaN children) and ``mean ± CI``
    (``n=1, no CI`` for one value, ``–`` for none); per arm other than scratch its paired difference to scratch
    and its pairs with the sign count (``6 (4+ 2−)``: the arm higher on 4 seeds, lower on 2)."""
    if cells is None:
        cells = {k: Cell(s.n) for k, s in summaries.items()}
    inits = sorted({i for _, i in cells if not is_diff(i)})
    arms = _arms(cells) or ["ssl"]
    table = Table(title=f"{study}: {metric} (mean ± 95% CI over seeds)")
    table.add_column("fraction %", justify="right")
    for init in inits:
        table.add_column(f"{init} n", justify="right")
        table.add_column(init, justify="right")
    for arm in arms:
        table.add_column("pairs" if arm == "ssl" else f"{arm} pairs", justify="right")
        table.add_column("SSL − scratch (paired)" if arm == "ssl" else f"{arm} − scratch (paired)", justify="right")
    for frac in sorted({f for f, _ in cells}):
        row = [f"{frac:g}"]
        for init in inits:
            c = cells.get((frac, init))
            row += [c.note() if c else "0", format_summary(summaries.get((frac, init)))]
        for arm in arms:
            d = summaries.get((frac, diff_name(arm)))
            diff = format_summary(d)
            if d is not None and d.low is not None and d.high is not None and (d.low > 0 or d.high < 0):
                diff = f"[bold {'green' if d.mean > 0 else 'red'}]{diff}[/]"
            pairs = cells.get((frac, diff_name(arm)))
            signs = f" ({d.signs[0]}+ {d.signs[1]}−)" if d is not None and d.n > 1 else ""
            row += [f"{pairs.n}{signs}" if pairs else "0", diff]
        table.add_row(*row)
    return table


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Long-format CSV: ``fraction,init,n,missing,nonfinite,mean,std,ci_low,ci_high,seeds,values,config_hash``
    (empty cells where undefined; ``seeds`` and ``values`` space-separated, ``values`` in the order of ``seeds``,
    for the paired-difference rows ``ssl-scratch``, ``ssl+st-scratch`` … the per-seed differences)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["fraction", "init", "n", "missing", "nonfinite", "mean", "std", "ci_low", "ci_high", "seeds", "values"]
    cols.append("config_hash")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    return path


def plot_curve(
    summaries: dict[tuple[float, str], Summary], path: str | Path, *, study: str, metric: str
) -> Path:
    """PNG: metric vs label fraction (log x), one line per init with its CI band (none where n = 1).

    Bands of metrics bounded to [0, 1] (Dice, AUC, accuracy) are clipped to that range.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"scratch": "tab:gray", "ssl": "tab:blue", "scratch+st": "tab:orange", "ssl+st": "tab:green"}
    fracs_all = sorted({f for f, _ in summaries})
    bounded = (
        metric.removeprefix("test_").removeprefix("val_").startswith(("dice", "auc", "accuracy", "balanced"))
    )
    for init in sorted({i for _, i in summaries if not is_diff(i)}):
        fr = [f for f in fracs_all if (f, init) in summaries]
        s = [summaries[(f, init)] for f in fr]
        mean = np.array([x.mean for x in s])
        lo = np.array([np.nan if x.low is None else x.low for x in s])
        hi = np.array([np.nan if x.high is None else x.high for x in s])
        ns = sorted({x.n for x in s})
        line = ax.plot(
            fr, mean, marker="o", color=colors.get(init), label=f"{init} (n={'/'.join(map(str, ns))})"
        )
        if bounded:  # a t-interval over 2 seeds can leave [0, 1]; the metric cannot
            lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
        ax.fill_between(fr, lo, hi, color=line[0].get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(fracs_all)
    ax.set_xticklabels([f"{f:g}%" for f in fracs_all])
    ax.minorticks_off()
    ax.set_xlabel("labelled training fraction (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{study}\n{metric}, mean ± 95% CI over seeds", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def compare_study(
    study: str,
    *,
    tracking_uri: str | None = None,
    metric: str | None = None,
    out_dir: str | Path | None = None,
    parent_run_id: str | None = None,
    confidence: float = 0.95,
    config_hash: str | None = None,
    log_to_parent: bool = True,
    target: float | None = None,
    within: float = 0.0,
) -> CompareResult:
    """Summarise a study from MLflow; the library entry point behind ``medssl compare --study NAME``.

    Args:
        study: the pipeline's ``study`` name (tag ``medssl.study``).
        tracking_uri: default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``.
        metric: metric to compare; default the study's (parent tag ``medssl.metric``).
        out_dir: where ``<study>_<metric>.csv`` / ``.png`` go; default ``<sweep folder>/compare``.
        parent_run_id: a specific parent run (default: the study's newest).
        confidence: CI level.
        config_hash: which finetune config to compare when a cell mixes several (``medssl.config_hash``):
            ``"latest"`` (per cell the newest child's) or hashes / prefixes, comma-separated; ``None``
            refuses mixed cells.
        log_to_parent: log the CSV/PNG and :func:`summary_metrics` to the parent run.
        target, within: the goal of the labels-needed headline (:func:`~medssl.tracking.efficiency.label_efficiency`;
            default: scratch's mean at the largest fraction, tolerance ``within`` in metric units).

    Raises:
        MedsslError: unknown study (known ones named), no FINISHED child logged ``metric`` (the metrics that
            exist are named), or a cell mixes config hashes (named with counts and an example key).
    """
    uri = tracking_uri or default_tracking_uri()
    client = make_client(uri)
    try:
        parents = find_study_runs(client, study)
    except Exception as e:  # noqa: BLE001 - transport/store errors become one clear line
        raise MedsslError(f"cannot read MLflow at {uri}: {e}") from e
    if parent_run_id:
        parents = [p for p in parents if p.info.run_id == parent_run_id]
    if not parents:
        raise MedsslError(f"no study {study!r} in MLflow at {uri}; known studies: {known_studies(client)}")
    parent = parents[0]
    metric = metric or parent.data.tags.get("medssl.metric") or "test_dice_mean"
    records = collect_records(client, parent, metric, config_hash=config_hash, study=study)
    if all(r["status"] == "missing" for r in records):
        have = sorted({m for r in child_runs(client, parent) for m in r.data.metrics})
        raise MedsslError(
            f"study {study!r}: no FINISHED child run logged {metric!r}; metrics present: {have}"
        )
    note = machine_note(records)
    if note:
        log.warning("study %s: %s", study, note)
    summaries = summarise(records, confidence)
    cells = cell_counts(records)
    rows = _rows(summaries, cells)
    sweep_dir = parent.data.tags.get("medssl.sweep_dir")
    out = Path(out_dir) if out_dir else (Path(sweep_dir) / "compare" if sweep_dir else Path("runs/compare"))
    csv_path = write_csv(rows, out / f"{study}_{metric}.csv")
    png_path = plot_curve(summaries, out / f"{study}_{metric}.png", study=study, metric=metric)
    eff = label_efficiency(
        {k: v for k, v in summaries.items() if not is_diff(k[1])}, metric, target=target, within=within,
        paired={f: v for (f, i), v in summaries.items() if i == DIFF},
    )
    parent_metrics = summary_metrics(summaries, cells, metric) | efficiency_metrics(eff)
    if log_to_parent:
        _log_to_parent(client, parent.info.run_id, parent_metrics, (csv_path, png_path))
    return CompareResult(
        study,
        metric,
        parent.info.run_id,
        records,
        rows,
        build_table(summaries, study, metric, cells),
        csv_path,
        png_path,
        summaries,
        cells,
        parent_metrics,
        eff,
        note,
    )


def _log_to_parent(client: Any, run_id: str, metrics: dict[str, float], files: tuple[Path, ...]) -> None:
    """Summary metrics (step 0) and the CSV/PNG under ``compare/`` on the parent run; failures are warnings."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    except Exception as e:  # noqa: BLE001 - the table and files are there; say so and go on
        log.warning("could not log the summary metrics to the parent run %s: %s", run_id, e)
    for p in files:
        try:
            client.log_artifact(run_id, str(p), "compare")
        except Exception as e:  # noqa: BLE001
            log.warning("could not log %s to the parent run %s: %s", p.name, run_id, e)

