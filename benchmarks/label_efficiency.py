"""The issue-5 label-efficiency studies, end to end, with a Markdown report for ``benchmarks/RESULTS.md``.

Runs (or resumes) ``medssl sweep`` on a pipeline file, then ``medssl compare`` for the primary metric and
a few secondary ones, copies the CSV/PNG into ``benchmarks/figures/`` and prints a Markdown section: the
per-(fraction, init) table (mean ± 95 % CI over seeds, paired SSL − scratch), per-seed values, the
issue's targets evaluated from the measured numbers (never asserted here: a missed target is reported),
wall-clock time and the machine.

    export MEDSSL_DATASETS=../shared/datasets
    python benchmarks/label_efficiency.py pipelines/label_efficiency.yaml --workdir ../studies
    python benchmarks/label_efficiency.py pipelines/classification_adrenal.yaml --workdir ../studies
    python benchmarks/label_efficiency.py pipelines/label_efficiency.yaml --workdir ../studies --report-only

The work directory holds the study folders and the MLflow store (``sqlite:///<workdir>/mlruns.db`` unless
``MLFLOW_TRACKING_URI`` is set); re-running the same command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from medssl.tracking.compare import DIFF, diff_name, is_diff  # noqa: E402  (paired-difference rows of the summaries)

FIGURES = Path(__file__).resolve().parent / "figures"


def _mean(s: dict[tuple[float, str], Any], frac: float, init: str) -> float | None:
    x = s.get((frac, init))
    return None if x is None else x.mean


def targets(metric: str, s: dict[tuple[float, str], Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for ``metric`` evaluated on the summaries: ``(target, measured, met)``."""
    out: list[tuple[str, str, bool | None]] = []
    if metric == "test_dice_mean":
        ssl10, scr100, ssl100 = _mean(s, 10.0, "ssl"), _mean(s, 100.0, "scratch"), _mean(s, 100.0, "ssl")
        if ssl10 is not None and scr100 is not None:
            gap = scr100 - ssl10
            out.append(("SSL at 10 % within 0.02 Dice of scratch at 100 %",
                        f"SSL@10 % {ssl10:.4f} vs scratch@100 % {scr100:.4f} (gap {gap:+.4f})", gap <= 0.02))
        if ssl100 is not None:
            out.append(("SSL at 100 % mean Dice ≥ 0.88", f"{ssl100:.4f}", ssl100 >= 0.88))
    if metric == "test_auc":
        for init in ("scratch", "ssl"):
            v = _mean(s, 100.0, init)
            if v is not None:
                out.append((f"AUC ≥ 0.87 at 100 % ({init})", f"{v:.4f}", v >= 0.87))
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if x.low is None:
        return f"{x.mean:.4f} (n={x.n}, no CI)"
    return f"{x.mean:.4f} ± {(x.high - x.low) / 2:.4f}"


def _value(record: dict[str, Any]) -> str:
    """A per-seed value of :attr:`CompareResult.records`: the number, or why there is none."""
    status = record.get("status", "ok")
    return f"{record['value']:.4f}" if status == "ok" else status


def study_minutes(tracking_uri: str | None, parent_run_id: str) -> tuple[float | None, int]:
    """Wall-clock minutes of the study's parent run (start → end, or → now while it runs) and its child count."""
    from medssl.tracking.compare import child_runs
    from medssl.tracking.mlflow_tracker import make_client

    client = make_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = child_runs(client, parent)
    starts = [r.info.start_time for r in [parent, *children] if r.info.start_time]
    ends = [r.info.end_time for r in [parent, *children] if r.info.end_time]
    if not starts or not ends:
        return None, len(children)
    return (max(ends) - min(starts)) / 60_000, len(children)


def report(results: list[Any], *, pipeline: Path, seconds: float | None, minutes: float | None = None) -> str:
    """Markdown for RESULTS.md from :class:`medssl.tracking.compare.CompareResult` objects (first = primary)."""
    main = results[0]
    s = main.summaries
    fracs = sorted({f for f, _ in s})
    lines = [
        f"### {main.study} ({pipeline.as_posix()})",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
        + (f"; wall clock of this invocation {seconds / 60:.1f} min" if seconds is not None else "")
        + (f"; study wall clock (first child start → last child end, MLflow) {minutes:.0f} min"
           if minutes is not None else "")
        + f". MLflow parent run `{main.parent_run_id}`.",
        "",
        f"| fraction % | n seeds | {main.metric} scratch | {main.metric} SSL | SSL − scratch (paired) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for f in fracs:
        n = max((x.n for k, x in s.items() if k[0] == f and not is_diff(k[1])), default=0)
        lines.append(f"| {f:g} | {n} | {_fmt(s.get((f, 'scratch')))} | {_fmt(s.get((f, 'ssl')))} | "
                     f"{_fmt(s.get((f, DIFF)))} |")
    students = sorted({i for _, i in s if i not in ("scratch", "ssl") and not is_diff(i)})
    if students:  # self-training arms (pipeline self_training): each with its paired difference to scratch
        lines += ["", "| fraction % | " + " | ".join(f"{a} | {a} − scratch (paired)" for a in students) + " |",
                  "|---:|" + "---:|---:|" * len(students)]
        for f in fracs:
            if any((f, a) in s for a in students):
                cells = [f"{f:g}"] + [c for a in students for c in (_fmt(s.get((f, a))), _fmt(s.get((f, diff_name(a)))))]
                lines.append("| " + " | ".join(cells) + " |")
    if len(results) > 1:
        lines += ["", "| fraction % | " + " | ".join(f"{r.metric} scratch | {r.metric} SSL" for r in results[1:])
                  + " |", "|---:|" + "---:|---:|" * (len(results) - 1)]
        for f in fracs:
            cells = [f"{f:g}"]
            for r in results[1:]:
                cells += [_fmt(r.summaries.get((f, "scratch"))), _fmt(r.summaries.get((f, "ssl")))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mean ± half-width of the 95 % t-interval over seeds (n per cell: "
              + ", ".join(sorted({str(x.n) for k, x in s.items() if not is_diff(k[1])})) + ").", ""]
    per_seed = sorted(main.records, key=lambda r: (r["fraction"], r["init"], r["seed"]))
    lines.append(f"Per seed ({main.metric}): " + "; ".join(
        f"{r['fraction']:g} % {r['init']} s{r['seed']} {_value(r)}" for r in per_seed) + ".")
    excluded = [r for r in per_seed if r.get("status", "ok") != "ok"]
    if excluded:  # counted in the table's n, never averaged
        lines.append(f"Not averaged ({len(excluded)} children, metric missing or non-finite): "
                     + ", ".join(f"{r['fraction']:g} % {r['init']} s{r['seed']}" for r in excluded) + ".")
    if main.efficiency is not None:
        lines.append(f"Labels needed: {main.efficiency.sentence()}.")
    lines.append("")
    tg = targets(main.metric, s)
    if tg:
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in tg]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("studies"), help="study folders + MLflow store")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override key=value")
    ap.add_argument("--metrics", nargs="*", default=None,
                    help="secondary metrics (default: per-class Dice for segmentation, accuracy for classification)")
    ap.add_argument("--report-only", action="store_true", help="do not run the sweep; summarise what is there")
    ap.add_argument("--no-figures", action="store_true", help="do not copy CSV/PNG into benchmarks/figures")
    ap.add_argument("--config-hash", default=None,
                    help="where a cell mixes finetune configs: 'latest' or hash(es) (medssl compare --config-hash)")
    args = ap.parse_args(argv)

    from medssl.engines.studies.pipeline import load_pipeline
    from medssl.engines.studies.sweep import run_sweep
    from medssl.tracking.compare import compare_study

    pipeline = args.pipeline.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # the pipeline's relative out_dir and the default sqlite store live here
    pl = load_pipeline(pipeline, args.overrides)
    seconds = None
    if not args.report_only:
        t0 = time.perf_counter()
        res = run_sweep(pl, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t0
        if res.failed:
            print(f"{len(res.failed)} children FAILED: " + ", ".join(c.key for c in res.failed), file=sys.stderr)
    primary = pl.metric
    secondary = args.metrics
    if secondary is None:
        secondary = ["test_dice_1", "test_dice_2", "test_hd95_mean"] if primary.startswith("test_dice") \
            else ["test_balanced_accuracy"]
    results = [compare_study(pl.study, tracking_uri=pl.tracking_uri, metric=m, config_hash=args.config_hash)
               for m in [primary, *secondary]]
    if not args.no_figures:
        FIGURES.mkdir(exist_ok=True)
        for i, r in enumerate(results):  # every CSV; the plot of the primary metric only
            for p in (r.csv_path, r.png_path) if i == 0 else (r.csv_path,):
                shutil.copy2(p, FIGURES / p.name)
    minutes, _ = study_minutes(pl.tracking_uri, results[0].parent_run_id)
    print(report(results, pipeline=args.pipeline, seconds=seconds, minutes=minutes))
    return 1 if not args.report_only and res.failed else 0


if __name__ == "__main__":
    from medssl.errors import MedsslError

    try:
        sys.exit(main())
    except MedsslError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
