"""GPU suite, part 3 helpers: the dry run's data subset, and the study's JSON + Markdown summary.

The study itself runs as ``medssl sweep pipelines/label_efficiency_gpu.yaml`` + ``medssl compare`` +
``benchmarks/label_efficiency.py --report-only`` (see ``benchmarks/gpu_suite.sh``); this script only

- ``subset``: copies the first N image/label pairs of an MSD folder (with a trimmed ``dataset.json``)
  into ``<dst>/msd_task04_hippocampus``, the tiny data of the CPU dry run;
- ``summarise``: reads the study's runs from MLflow (parent found by its ``medssl.study`` tag; every
  child's status, test metrics and wall time) and the shell's step timings, and writes ``study_gpu.json``
  and ``study_gpu.md`` (the per-child table, then ``label_efficiency.py``'s report when it ran).

    python benchmarks/gpu_study.py subset --src $MEDSSL_DATASETS/msd_task04_hippocampus --dst tiny --n 14
    python benchmarks/gpu_study.py summarise --study hippocampus-label-efficiency-gpu \\
        --tracking-uri sqlite:///work/mlruns.db --out gpu_out --step sweep 0 190.5 --report work/report.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import machine, md_table, write_part  # noqa: E402

__all__ = ["make_subset", "study_runs", "main"]

log = logging.getLogger("gpu_study")
PART = "study_gpu"
METRICS = ("test_dice_mean", "test_dice_1", "test_dice_2", "test_hd95_mean")


def make_subset(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` cases of the MSD folder ``src`` (``imagesTr``/``labelsTr`` + ``dataset.json``)
    into ``dst/<src name>``; returns that folder.

    Raises:
        SystemExit: ``src`` has no ``dataset.json`` training list (the message names the file).
    """
    meta_path = src / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        items = meta["training"][:n]
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"cannot read the training list of {meta_path}: {e}") from e
    out = dst / src.name
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for it in items:
        for key in ("image", "label"):
            shutil.copy2(src / it[key], out / it[key])
    meta.update(training=items, numTraining=len(items))
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def study_runs(study: str, tracking_uri: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``(parent run id, children)`` of the newest parent run of ``study``; each child is a dict with
    ``key`` (sweep key, e.g. ``f10-ssl-s0``, or ``pretrain``), ``kind``, ``status``, ``wall_s`` and the
    test metrics it logged (:data:`METRICS`)."""
    from medssl.tracking.compare_select import child_runs, find_study_runs
    from medssl.tracking.mlflow_tracker import make_client

    client = make_client(tracking_uri)
    parents = find_study_runs(client, study)
    if not parents:
        return None, []
    children = []
    for run in child_runs(client, parents[0]):
        t, info = run.data.tags, run.info
        row: dict[str, Any] = {
            "key": t.get("medssl.sweep_key") or t.get("medssl.kind", "?"),
            "kind": t.get("medssl.kind"),
            "status": info.status,
            "wall_s": (info.end_time - info.start_time) / 1e3 if info.end_time and info.start_time else None,
            "error": t.get("medssl.error"),
        }
        for m in METRICS:
            v = run.data.metrics.get(m)
            row[m] = v if v is None or math.isfinite(v) else None
        children.append(row)
    children.sort(key=lambda r: (r["kind"] != "pretrain", r["key"]))
    return parents[0].info.run_id, children


def summarise(args: argparse.Namespace) -> int:
    """Write ``study_gpu.json`` / ``study_gpu.md``; exit status 0 when every expected child FINISHED."""
    t0 = time.perf_counter()
    steps = {name: {"rc": int(rc), "wall_s": float(s)} for name, rc, s in args.step}
    parent, children = None, []
    error = None
    try:
        parent, children = study_runs(args.study, args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - an unreadable store is reported, not raised
        log.exception("cannot read the MLflow store")
        error = f"{type(e).__name__}: {e}"[:500]
    report = args.report.read_text() if args.report and args.report.is_file() else ""
    finetune = [c for c in children if c["kind"] == "finetune"]
    done = [c for c in finetune if c["status"] == "FINISHED"]
    payload = {
        "dry_run": args.dry_run,
        "machine": machine(args.device),
        "study": args.study,
        "pipeline": args.pipeline,
        "tracking_uri": args.tracking_uri,
        "parent_run_id": parent,
        "steps": steps,
        "children": children,
        "expected_finetune_children": args.expected,
        "finished_finetune_children": len(done),
        "report_included": bool(report.strip()),
        "error": error,
        "wall_s": sum(s["wall_s"] for s in steps.values()) + time.perf_counter() - t0,
    }
    facts = payload["machine"]
    where = facts["gpu"] or f"{facts['device']} ({facts['cpu']})"
    md = [
        f"### Hippocampus label efficiency at a GPU budget, seed 0, on {where} (issue 12, GPU suite part 3)"
        + (" — DRY RUN (tiny subset, CPU)" if args.dry_run else ""),
        "",
        f"`medssl sweep {args.pipeline}` + `medssl compare --study {args.study}` into `{args.tracking_uri}`; "
        f"torch {facts['torch']}, CUDA {facts['cuda']}. Steps (exit code, wall s): "
        + ", ".join(f"{k} {v['rc']} / {v['wall_s']:.0f} s" for k, v in steps.items())
        + f". {len(done)} of {args.expected} finetuning runs finished.",
        "",
        md_table(
            ["run", "status", "test Dice mean", "Dice 1 (anterior)", "Dice 2 (posterior)", "HD95 mean (mm)",
             "wall s"],
            [[c["key"], c["status"], c["test_dice_mean"], c["test_dice_1"], c["test_dice_2"],
              c["test_hd95_mean"], c["wall_s"]] for c in children],
        ),
    ]
    failed = [c for c in children if c["status"] != "FINISHED"]
    if failed:
        md += ["", "Not finished: " + "; ".join(f"{c['key']} {c['status']}"
                                                   + (f" ({c['error']})" if c["error"] else "") for c in failed)]
    if report.strip():
        md += ["", "`benchmarks/label_efficiency.py --report-only`:", "", report.strip()]
    write_part(args.out, PART, payload, "\n".join(md))
    return 0 if len(done) >= args.expected and not error else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset", help="copy the first N cases of an MSD folder")
    s.add_argument("--src", type=Path, required=True)
    s.add_argument("--dst", type=Path, required=True)
    s.add_argument("--n", type=int, default=14)
    m = sub.add_parser("summarise", help="write study_gpu.json / .md from MLflow")
    m.add_argument("--study", required=True)
    m.add_argument("--tracking-uri", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--pipeline", default="pipelines/label_efficiency_gpu.yaml")
    m.add_argument("--report", type=Path, default=None, help="label_efficiency.py's Markdown, if it ran")
    m.add_argument("--step", nargs=3, action="append", default=[], metavar=("NAME", "RC", "SECONDS"))
    m.add_argument("--expected", type=int, default=6, help="finetuning children of the grid")
    m.add_argument("--device", default="cpu", help="device of the study (for the machine facts)")
    m.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "subset":
        sys.stdout.write(f"{make_subset(args.src, args.dst, args.n)}\n")
        return 0
    return summarise(args)


if __name__ == "__main__":
    sys.exit(main())
