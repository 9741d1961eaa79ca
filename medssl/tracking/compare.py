"""``medssl compare``: read a study's child runs from MLflow, summarise a metric per label fraction and init
(mean ± 95 % CI over seeds) plus the paired SSL − scratch difference, and write a rich table, a CSV and a
PNG curve (metric vs label fraction, log x axis, CI bands), logged back to the study's parent run.

Runs are found by tags only: the parent has ``medssl.kind = sweep`` and ``medssl.study``; its children carry
``medssl.fraction`` / ``medssl.init`` / ``medssl.seed`` (see :mod:`medssl.sweep`). Only FINISHED children
count; of several runs of one (fraction, init, seed) the newest is used.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from medssl.errors import MedsslError
from medssl.tracking.mlflow_tracker import default_tracking_uri, make_client
from medssl.tracking.stats import Summary, format_summary, mean_ci, paired_difference

__all__ = [
    "CompareResult",
    "compare_study",
    "find_study_runs",
    "child_runs",
    "collect_records",
    "summarise",
    "build_table",
    "write_csv",
    "plot_curve",
]

log = logging.getLogger(__name__)

DIFF = "ssl-scratch"


@dataclass
class CompareResult:
    """Output of :func:`compare_study`.

    Attributes:
        records: one dict per used child run: ``fraction`` (percent), ``init``, ``seed``, ``value``,
            ``run_id``.
        rows: one dict per (fraction, init ∈ inits ∪ {``"ssl-scratch"``}): ``n``, ``mean``, ``std``,
            ``ci_low``, ``ci_high`` (``None`` for n = 1), ``seeds`` — the CSV rows.
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


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def find_study_runs(client: Any, study: str, experiment_ids: list[str] | None = None) -> list[Any]:
    """Parent (``medssl.kind = sweep``) runs of ``study``, newest first, in the given or all experiments."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = f"tags.`medssl.study` = {_quote(study)} and tags.`medssl.kind` = 'sweep'"
    return list(
        client.search_runs(
            experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=1000
        )
    )


def child_runs(client: Any, parent: Any) -> list[Any]:
    """All child runs of a parent run (any status), newest first."""
    query = f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}"
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=query,
            order_by=["attributes.start_time DESC"],
            max_results=10000,
        )
    )


def collect_records(client: Any, parent: Any, metric: str) -> list[dict[str, Any]]:
    """FINISHED child runs of ``parent`` that logged ``metric``, newest per (fraction, init, seed)."""
    seen: set[tuple[float, str, int]] = set()
    out = []
    for run in child_runs(client, parent):  # newest first
        t = run.data.tags
        if run.info.status != "FINISHED" or t.get("medssl.kind") == "pretrain":
            continue
        if not all(k in t for k in ("medssl.fraction", "medssl.init", "medssl.seed")):
            continue
        if metric not in run.data.metrics:
            continue
        key = (float(t["medssl.fraction"]), t["medssl.init"], int(t["medssl.seed"]))
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {
                "fraction": key[0],
                "init": key[1],
                "seed": key[2],
                "value": float(run.data.metrics[metric]),
                "run_id": run.info.run_id,
            }
        )
    return sorted(out, key=lambda r: (r["fraction"], r["init"], r["seed"]))


def summarise(records: list[dict[str, Any]], confidence: float = 0.95) -> dict[tuple[float, str], Summary]:
    """``(fraction, init) → Summary`` over seeds, plus ``(fraction, "ssl-scratch")`` paired differences."""
    by: dict[tuple[float, str], dict[int, float]] = {}
    for r in records:
        by.setdefault((r["fraction"], r["init"]), {})[r["seed"]] = r["value"]
    out: dict[tuple[float, str], Summary] = {}
    for (frac, init), vals in sorted(by.items()):
        seeds = sorted(vals)
        out[(frac, init)] = mean_ci([vals[s] for s in seeds], confidence, seeds=seeds)
    for frac in sorted({f for f, _ in by}):
        if (frac, "ssl") in by and (frac, "scratch") in by:
            d = paired_difference(by[(frac, "ssl")], by[(frac, "scratch")], confidence)
            if d is not None:
                out[(frac, DIFF)] = d
    return out


def _rows(summaries: dict[tuple[float, str], Summary]) -> list[dict[str, Any]]:
    return [
        {
            "fraction": f,
            "init": init,
            "n": s.n,
            "mean": s.mean,
            "std": s.std,
            "ci_low": s.low,
            "ci_high": s.high,
            "seeds": " ".join(str(x) for x in s.seeds),
        }
        for (f, init), s in summaries.items()
    ]


def build_table(summaries: dict[tuple[float, str], Summary], study: str, metric: str) -> Table:
    """Rich table: a row per fraction; per init ``n`` and ``mean ± CI``; the paired SSL − scratch diff."""
    inits = sorted({i for _, i in summaries if i != DIFF})
    table = Table(title=f"{study}: {metric} (mean ± 95% CI over seeds)")
    table.add_column("fraction %", justify="right")
    for init in inits:
        table.add_column(f"{init} n", justify="right")
        table.add_column(init, justify="right")
    table.add_column("SSL − scratch (paired)", justify="right")
    for frac in sorted({f for f, _ in summaries}):
        cells = [f"{frac:g}"]
        for init in inits:
            s = summaries.get((frac, init))
            cells += [str(s.n) if s else "0", format_summary(s)]
        d = summaries.get((frac, DIFF))
        diff = format_summary(d)
        if d is not None and d.low is not None and (d.low > 0 or d.high < 0):
            diff = f"[bold {'green' if d.mean > 0 else 'red'}]{diff}[/]"
        cells.append(diff)
        table.add_row(*cells)
    return table


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Long-format CSV: ``fraction,init,n,mean,std,ci_low,ci_high,seeds`` (empty cells where undefined)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["fraction", "init", "n", "mean", "std", "ci_low", "ci_high", "seeds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in cols})
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
    colors = {"scratch": "tab:gray", "ssl": "tab:blue"}
    fracs_all = sorted({f for f, _ in summaries})
    bounded = metric.removeprefix("test_").removeprefix("val_").startswith(("dice", "auc", "accuracy", "balanced"))
    for init in sorted({i for _, i in summaries if i != DIFF}):
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
) -> CompareResult:
    """Summarise a study from MLflow; the library entry point behind ``medssl compare --study NAME``.

    Args:
        study: the pipeline's ``study`` name (tag ``medssl.study``).
        tracking_uri: default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``.
        metric: metric to compare; default the study's (parent tag ``medssl.metric``).
        out_dir: where ``<study>_<metric>.csv`` / ``.png`` go; default ``<sweep folder>/compare``.
        parent_run_id: a specific parent run (default: the study's newest).
        confidence: CI level.

    Raises:
        MedsslError: unknown study (known ones named), or no finished child logged ``metric`` (the
            metrics that exist are named).
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
        raise MedsslError(f"no study {study!r} in MLflow at {uri}; known studies: {_known_studies(client)}")
    parent = parents[0]
    metric = metric or parent.data.tags.get("medssl.metric") or "test_dice_mean"
    records = collect_records(client, parent, metric)
    if not records:
        have = sorted({m for r in child_runs(client, parent) for m in r.data.metrics})
        raise MedsslError(
            f"study {study!r}: no FINISHED child run logged {metric!r}; metrics present: {have}"
        )
    summaries = summarise(records, confidence)
    rows = _rows(summaries)
    sweep_dir = parent.data.tags.get("medssl.sweep_dir")
    out = Path(out_dir) if out_dir else (Path(sweep_dir) / "compare" if sweep_dir else Path("runs/compare"))
    csv_path = write_csv(rows, out / f"{study}_{metric}.csv")
    png_path = plot_curve(summaries, out / f"{study}_{metric}.png", study=study, metric=metric)
    for p in (csv_path, png_path):
        try:
            client.log_artifact(parent.info.run_id, str(p), "compare")
        except Exception as e:  # noqa: BLE001 - the local files are there; say so and go on
            log.warning("could not log %s to the parent run %s: %s", p.name, parent.info.run_id, e)
    return CompareResult(
        study,
        metric,
        parent.info.run_id,
        records,
        rows,
        build_table(summaries, study, metric),
        csv_path,
        png_path,
        summaries,
    )


def _known_studies(client: Any) -> list[str]:
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(exps, filter_string="tags.`medssl.kind` = 'sweep'", max_results=1000)
            if exps
            else []
        )
    except Exception:  # noqa: BLE001
        return []
    return sorted({r.data.tags.get("medssl.study", "?") for r in runs})
