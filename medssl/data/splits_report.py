"""What a ``splits.json`` holds and whether anything leaks: ``medssl split --report`` and the sweep's check.

:func:`splits_report` counts cases, patient groups and classes per split (the fixed test set, the study-wide
pretraining pool, and per seed its validation set, training cases, every label fraction and its own pool) and
runs the leakage checks, each a PASS/FAIL line:

- ``datalist``: every case id of the splits is in the datalist (else the splits belong to another datalist);
- ``groups``: no patient group crosses test / validation / training (the largest fraction) for any seed;
- ``fractions``: 1 % ⊂ 5 % ⊂ … and every fraction lies outside the test and the seed's validation set;
- ``pretrain pool``: the study-wide pool shares no case with the test set or any seed's validation set;
- ``pool groups``: nor any patient (an unlabelled follow-up scan of a held-out patient counts);
- ``seed pools``: each seed's own pool shares no case or patient with the test set or that seed's validation.

A version-1 file (split per case) fails ``groups`` when the datalist's ``group_id`` put one patient's scans on
both sides; re-split it. Group ids are salted hashes (no PHI), printed as examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medssl.data.split_groups import group_of
from medssl.data.splits_io import datalist_items, load_splits
from medssl.errors import MedsslError

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["check_splits", "report_lines", "report_table", "splits_report"]

logger = logging.getLogger(__name__)


def _examples(ids: Iterable[str], n: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (", …" if len(ids) > n else "")


def splits_report(splits: dict, items: list[dict]) -> dict[str, Any]:
    """Counts per split and the leakage checks of the module docstring.

    Args:
        splits: a splits dict (:func:`medssl.data.splits_io.load_splits`).
        items: the datalist's items (every section), with ``case_id`` and optionally ``group_id`` and the
            class key of ``splits["params"]["stratify_key"]``.

    Returns:
        ``{"rows": [{"split", "cases", "groups", "classes": {class: n}}], "classes": [class keys],
        "checks": [{"name", "ok", "detail"}], "ok": bool}``.
    """
    gid = {str(it["case_id"]): group_of(it) for it in items if it.get("case_id")}
    key = (splits.get("params") or {}).get("stratify_key")
    klass = {str(it["case_id"]): str(it[key]) for it in items
             if key and it.get("case_id") and it.get(key) is not None}
    groups = lambda ids: {gid.get(c, c) for c in ids}  # noqa: E731 - a case unknown to the datalist: itself

    rows: list[dict[str, Any]] = []

    def row(name: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        rows.append({"split": name, "cases": len(ids), "groups": len(groups(ids)),
                     "classes": dict(sorted(Counter(klass[c] for c in ids if c in klass).items()))})

    test, pool = set(splits["test"]), set(splits["pretrain_pool"])
    vals = {s: set(v["validation"]) for s, v in splits["seeds"].items()}
    all_vals = set().union(*vals.values())
    row("test", test)
    row("pretrain pool (study)", pool)
    checks: list[dict[str, Any]] = []

    def check(name: str, problems: list[str], ok_detail: str) -> None:
        checks.append({"name": name, "ok": not problems, "detail": "; ".join(problems[:3]) or ok_detail})

    crossing, unnested = [], []
    for s, sd in splits["seeds"].items():
        fr = sorted(sd["fractions"], key=float)
        train = set(sd["fractions"][fr[-1]]) if fr else set()
        row(f"seed {s} validation", vals[s])
        row(f"seed {s} training", train)
        prev: set[str] = set()
        for k in fr:
            cur = set(sd["fractions"][k])
            row(f"seed {s} {k} %", cur)
            if not prev <= cur or cur & (test | vals[s]):
                unnested.append(f"seed {s}: fraction {k} % is not nested or overlaps test/validation")
            prev = cur
        row(f"seed {s} pool", splits["unlabeled"].get(s, []))
        roles = {"test": groups(test), "validation": groups(vals[s]), "training": groups(train)}
        for a, b in (("test", "validation"), ("test", "training"), ("validation", "training")):
            both = roles[a] & roles[b]
            if both:
                crossing.append(f"seed {s}: {len(both)} patient group(s) in both {a} and {b} "
                                f"(e.g. {_examples(both)})")
    every = set(gid) | test | pool | all_vals | set().union(*splits["unlabeled"].values())
    unknown = every - set(gid)
    check("datalist", [f"{len(unknown)} case id(s) of the splits are not in the datalist (e.g. "
                       f"{_examples(unknown)}): splits of another datalist?"] if unknown else [],
          f"{len(every)} case ids, all in the datalist")
    check("groups", crossing, f"{len(set(gid.values()))} patient groups, none crosses test/validation/training")
    check("fractions", unnested, "nested and outside test/validation for every seed")
    leak = pool & (test | all_vals)
    check("pretrain pool", [f"{len(leak)} test/validation case(s) in the pretraining pool (e.g. "
                            f"{_examples(leak)})"] if leak else [],
          f"{len(pool)} cases, disjoint from the test set and all {len(vals)} validation sets")
    shared = groups(pool) & groups(test | all_vals)
    check("pool groups", [f"{len(shared)} held-out patient group(s) in the pretraining pool (e.g. "
                          f"{_examples(shared)})"] if shared else [],
          "no held-out patient in the pretraining pool")
    seed_leaks = [f"seed {s}: {len(bad)} held-out case(s)/patient(s) in its pool" for s, v in vals.items()
                  if (bad := groups(splits["unlabeled"].get(s, [])) & groups(test | v))]
    check("seed pools", seed_leaks, "each seed's pool is disjoint from the test set and its validation set")
    classes = sorted({c for r in rows for c in r["classes"]})
    return {"rows": rows, "classes": classes, "checks": checks, "ok": all(c["ok"] for c in checks)}


def report_lines(report: dict[str, Any]) -> list[str]:
    """``"PASS groups: …"`` / ``"FAIL pool groups: …"``, one line per check."""
    return [f"{'PASS' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in report["checks"]]


def report_table(report: dict[str, Any], title: str) -> Table:
    """Rich ``Table``: one row per split with cases, patient groups and cases per class."""
    from rich.table import Table

    table = Table(title=title)
    for col in ["split", "cases", "groups"] + [f"class {c}" for c in report["classes"]]:
        table.add_column(col, justify="left" if col == "split" else "right")
    for r in report["rows"]:
        table.add_row(r["split"], str(r["cases"]), str(r["groups"]),
                      *[str(r["classes"].get(c, 0)) for c in report["classes"]])
    return table


def check_splits(datalist: str | Path, splits_path: str | Path) -> dict[str, Any]:
    """Report on ``splits_path`` against ``datalist``, log the table and the PASS/FAIL lines, and refuse a
    leaking split (what ``medssl sweep`` runs when it prepares its data).

    Raises:
        MedsslError: unreadable files, or a FAIL line (named, with the file).
    """
    from rich.console import Console

    sections = datalist_items(datalist)
    report = splits_report(load_splits(splits_path), [it for sec in sections.values() for it in sec])
    console = Console(width=120, color_system=None)
    with console.capture() as cap:
        console.print(report_table(report, title=f"splits {splits_path}"))
    logger.info("%s\n%s", cap.get().rstrip(), "\n".join(report_lines(report)))
    failed = [line for line in report_lines(report) if line.startswith("FAIL")]
    if failed:
        raise MedsslError(f"{splits_path}: leakage check failed: {failed[0][5:]} (re-split with `medssl split`)")
    return report
