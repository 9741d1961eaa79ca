"""nnU-Net peer over seeds, side by side with medssl (issue 12, item 2): mean ± 95 % CI per arm and the paired
medssl − nnU-Net difference per (fraction, nnU-Net batch choice), with the statistics ``medssl compare`` uses
(:mod:`medssl.tracking.stats`: Student-t interval over seeds, pairs matched by seed = same training cases, same
fixed test set).

    python benchmarks/peer_summary.py studies/peer_nnunet \\
        --medssl-csv runs/sweeps/<study>/compare/<study>_test_dice_mean.csv --arm scratch
    python benchmarks/peer_summary.py studies/peer_nnunet --medssl 10:0=0.8552 --medssl 10:1=0.8502 ...

nnU-Net side: every ``<peer workdir>/*/result.json`` that ``benchmarks/peer_nnunet.py`` wrote, grouped by
(device, fraction, batch choice, budget); a group with two results of one seed is refused (two budgets or TTA
settings of the same seed must not be averaged as if they were seeds). The budget is what the run was given, not
the iterations it came to: ``--match-medssl`` runs group as "equal compute" and ``--minutes M`` runs as "M min"
(their iteration counts differ per seed because each run's probe times its own machine; the table lists them per
seed), ``--iterations N`` runs as "N it.". medssl side: a ``medssl compare`` CSV (its
``seeds`` and per-seed ``values`` columns) for one arm (``--arm``), and/or values given as
``FRACTION:SEED=VALUE`` (``--medssl``, e.g. the per-seed values RESULTS.md recorded from a study store that is
not on this machine; given values override the CSV's for that seed, and the output names the source).

Prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.tracking.stats import Summary, format_summary, mean_ci, paired_difference

__all__ = ["peer_runs", "peer_results", "budget_label", "medssl_values", "summary_rows", "markdown", "main"]

GroupKey = tuple[str, float, str, str]  # device, fraction, batch choice ("planner (batch 2)" …), budget label


def budget_label(result: dict[str, Any]) -> str:
    """The budget a peer run was *given*: ``"equal compute"`` (``--match-medssl``), ``"20 min"`` (``--minutes``)
    or ``"1125 it."`` (``--iterations``). Seeds of one label are comparable; their iteration counts may differ."""
    if result.get("matched_medssl"):
        return "equal compute"
    if result.get("budget_minutes"):
        return f"{float(result['budget_minutes']):g} min"
    return f"{int(result['iterations'])} it."


def peer_runs(workdir: Path, metric: str = "dice_mean") -> dict[GroupKey, dict[int, dict[str, Any]]]:
    """``{(device, fraction, batch, budget): {seed: {"value", "iterations", "minutes", "run"}}}`` from
    ``<workdir>/*/result.json``; ``minutes`` = the training minutes nnU-Net was given (``None`` for a fixed
    iteration count).

    Raises:
        MedsslError: no result file, an unreadable one or one without ``metric``, or two results of one seed in
            one group (naming both folders).
    """
    files = sorted(Path(workdir).glob("*/result.json"))
    if not files:
        raise MedsslError(f"no */result.json under {workdir}: run benchmarks/peer_nnunet.py first")
    out: dict[GroupKey, dict[int, dict[str, Any]]] = defaultdict(dict)
    for f in files:
        try:
            r = json.loads(f.read_text())
            value = float(r["metrics"][metric])
            key: GroupKey = (str(r.get("device", "cpu")), float(r["fraction"]), f"{r['batch_spec']} (batch "
                             f"{r['batch']}{'' if r.get('tta_mirroring', True) else ', no TTA'})", budget_label(r))
            seed = int(r["seed"])
            minutes = r.get("budget_minutes")
            record = {"value": value, "iterations": int(r["iterations"]), "run": f.parent,
                      "minutes": None if minutes is None else float(minutes)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MedsslError(f"{f}: not a peer_nnunet result with metrics.{metric} ({type(e).__name__}: {e})") from e
        if seed in out[key]:
            raise MedsslError(f"{f} and {out[key][seed]['run']} are both seed {seed} of {key}: keep one")
        out[key][seed] = record
    return dict(out)


def peer_results(workdir: Path, metric: str = "dice_mean") -> dict[GroupKey, dict[int, float]]:
    """``{(device, fraction, batch, budget): {seed: metric}}`` (:func:`peer_runs` without the run details)."""
    return {k: {s: r["value"] for s, r in v.items()} for k, v in peer_runs(workdir, metric).items()}


def medssl_values(csv_path: Path | None, arm: str, given: Iterable[str] = ()) -> dict[float, dict[int, float]]:
    """``{fraction: {seed: value}}`` of one medssl arm: a ``medssl compare`` CSV's rows of ``arm`` (per-seed
    ``values`` in the order of ``seeds``), then ``FRACTION:SEED=VALUE`` strings (they override the CSV's seed).

    Raises:
        MedsslError: an unreadable CSV or one without ``values`` (written before session 8's compare), a
            malformed ``FRACTION:SEED=VALUE``.
    """
    out: dict[float, dict[int, float]] = defaultdict(dict)
    if csv_path is not None:
        try:
            rows = list(csv.DictReader(Path(csv_path).open()))
        except OSError as e:
            raise MedsslError(f"cannot read {csv_path}: {e}") from e
        for row in rows:
            if row.get("init") != arm:
                continue
            if "values" not in row:
                raise MedsslError(f"{csv_path} has no per-seed 'values' column (re-run medssl compare)")
            seeds, values = row["seeds"].split(), row["values"].split()
            if len(seeds) != len(values):
                raise MedsslError(f"{csv_path}: {arm} at {row['fraction']} % lists {len(seeds)} seeds but "
                                  f"{len(values)} values")
            for s, v in zip(seeds, values, strict=True):
                out[float(row["fraction"])][int(s)] = float(v)
    for text in given:
        try:
            left, value = text.split("=")
            fraction, seed = left.split(":")
            out[float(fraction)][int(seed)] = float(value)
        except ValueError as e:
            raise MedsslError(f"--medssl {text!r}: expected FRACTION:SEED=VALUE, e.g. 10:0=0.8552") from e
    return dict(out)


def summary_rows(peer: dict[GroupKey, dict[int, dict[str, Any]]],
                 medssl: dict[float, dict[int, float]]) -> list[dict[str, Any]]:
    """One row per nnU-Net group of :func:`peer_runs`: its summary, medssl's on the same fraction (all its seeds),
    the paired medssl − nnU-Net difference on the seeds both have, and each seed's iterations and minutes."""
    rows = []
    for key in sorted(peer):
        device, fraction, batch, budget = key
        runs = peer[key]
        nn, ms = {s: r["value"] for s, r in runs.items()}, medssl.get(fraction, {})
        rows.append({
            "device": device, "fraction": fraction, "batch": batch, "budget": budget,
            "iterations": {s: runs[s]["iterations"] for s in sorted(runs)},
            "minutes": {s: runs[s]["minutes"] for s in sorted(runs)},
            "nnunet": mean_ci([nn[s] for s in sorted(nn)], seeds=sorted(nn)),
            "medssl": mean_ci([ms[s] for s in sorted(ms)], seeds=sorted(ms)) if ms else None,
            "paired": paired_difference(ms, nn) if ms else None,
        })
    return rows


def _budget(row: dict[str, Any]) -> str:
    """``"equal compute (0: 54.6 min / 2,870 it., 1: …)"``: what each seed was given and the iterations it came to
    (a fixed iteration budget is the label alone)."""
    if row["budget"].endswith("it."):
        return row["budget"]
    parts = [f"{seed}: {'' if minutes is None else f'{minutes:g} min / '}{row['iterations'][seed]:,} it."
             for seed, minutes in row["minutes"].items()]
    return f"{row['budget']} ({', '.join(parts)})"


def _per_seed(s: Summary | None) -> str:
    return "–" if s is None else ", ".join(f"{seed}: {v:.4f}" for seed, v in zip(s.seeds, s.values, strict=True))


def _paired(s: Summary | None) -> str:
    if s is None:
        return "– (no common seed)"
    up, down = s.signs
    ci = "" if s.half_width is None else f", CI {s.low:+.4f} … {s.high:+.4f}"
    return f"{s.mean:+.4f}{'' if s.half_width is None else f' ± {s.half_width:.4f}'} ({up}+ {down}−{ci})"


def markdown(rows: Sequence[dict[str, Any]], arm: str, metric: str) -> str:
    """The RESULTS.md table: one line per (device, fraction, nnU-Net batch, budget)."""
    lines = [f"| fraction | device | nnU-Net batch, budget (per seed) | nnU-Net {metric} | per seed | medssl `{arm}` | per seed "
             f"| medssl − nnU-Net (paired) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        nn, ms = r["nnunet"], r["medssl"]
        nn_n, ms_n = (("" if x is None or x.half_width is None else f" (n={x.n})") for x in (nn, ms))
        lines.append(f"| {r['fraction']:g} % | {r['device']} | {r['batch']}, {_budget(r)} | "
                     f"{format_summary(nn, 4)}{nn_n} | {_per_seed(nn)} | {format_summary(ms, 4)}{ms_n} | "
                     f"{_per_seed(ms)} | {_paired(r['paired'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path, help="peer_nnunet.py --workdir (holds <run>/result.json)")
    ap.add_argument("--medssl-csv", type=Path, help="a `medssl compare` CSV of the same metric (per-seed values)")
    ap.add_argument("--arm", default="scratch", help="medssl arm (init) of the CSV, e.g. scratch, ssl, scratch+st")
    ap.add_argument("--medssl", action="append", default=[], metavar="FRACTION:SEED=VALUE",
                    help="a medssl per-seed value (repeatable; overrides the CSV's seed)")
    ap.add_argument("--metric", default="dice_mean", help="key of result.json's metrics (the CSV must be the same)")
    args = ap.parse_args(argv)
    try:
        rows = summary_rows(peer_runs(args.workdir, args.metric),
                            medssl_values(args.medssl_csv, args.arm, args.medssl))
    except MedsslError as e:
        print(f"peer_summary: {e}", file=sys.stderr)
        return 1
    print(markdown(rows, args.arm, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
