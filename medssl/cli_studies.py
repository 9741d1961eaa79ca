"""`medssl sweep`, `medssl compare` and `medssl runs sync`: studies in MLflow, thin Typer wrappers over
:func:`medssl.engines.studies.sweep.run_sweep`, :func:`medssl.cluster.sweep_jobs.emit_sweep_jobs`,
:func:`medssl.tracking.compare.compare_study` and :func:`medssl.tracking.spool.replay_spools`.

Registered on the one ``app`` by :mod:`medssl.cli` (``runs_app`` as the ``runs`` group).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from medssl.cli_common import (
    EXIT_CHILDREN_FAILED,
    EXIT_ERROR,
    Verbose,
    console,
    err_console,
    fail,
    setup,
    write_estimate,
)
from medssl.errors import MedsslError

__all__ = ["compare", "runs_app", "runs_sync", "sweep"]


def sweep(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. pipelines/label_efficiency.yaml.")],
    new: Annotated[bool, typer.Option("--new", help="New parent run even if the study exists (default: resume it; a changed config or data is refused there, naming the keys).")] = False,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override key.sub=value (repeatable), e.g. --set 'seeds=[0]'.")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit to SLURM: pretraining, then one array task per child (afterok); see medssl.cluster.sweep_jobs.")] = False,
    emit_jobs: Annotated[Path | None, typer.Option("--emit-jobs", help="Only write the SLURM scripts (+ submit.sh) into this folder.")] = None,
    child: Annotated[str | None, typer.Option("--child", help="Run only 'pretrain' or child N (0-based): what a SLURM array task runs.")] = None,
    parent_run: Annotated[str | None, typer.Option("--parent-run", help="MLflow parent run id to log into (with --child).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count and time the whole study on this machine (one timed child per network shape, the pretraining timed): total and remaining hours; trains nothing, starts no MLflow run.")] = False,
    time_steps: Annotated[int, typer.Option(help="--dry-run: finetuning steps timed per network shape.")] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="--dry-run: also write the estimate as JSON here.")] = None,
    verbose: Verbose = False,
) -> None:
    """Pretrain once, then finetune each (fraction, init, seed) as an MLflow child run of one study.

    Exit code 4: the sweep finished but some children FAILED (their errors are in MLflow tag medssl.error).
    With jobs of an earlier --slurm submission still pending or running, it only shows their status.
    """
    from medssl.engines.studies.sweep import run_sweep

    setup(verbose)
    sets = list(overrides or [])
    try:
        if dry_run:
            from medssl.engines.studies.estimate import estimate_sweep

            _print_sweep_estimate(estimate_sweep(pipeline, overrides=sets, time_steps=time_steps), json_out)
            return
        if slurm or emit_jobs is not None:
            from medssl.cluster.sweep_jobs import emit_sweep_jobs

            jobs = emit_sweep_jobs(pipeline, overrides=sets, new=new, out=emit_jobs, submit=slurm)
            console.print(jobs.table())
            console.print(f"scripts: {jobs.folder}" + ("" if slurm else f"  (submit with {jobs.submit_script})"))
            return
        if child is None:
            from medssl.cluster.sweep_jobs import active_jobs, status_table

            if active_jobs(pipeline, sets):
                console.print(status_table(pipeline, sets))
                return
        res = run_sweep(pipeline, overrides=sets, new=new, progress=sys.stderr.isatty(), child=child,
                        parent_run_id=parent_run)
    except MedsslError as e:
        raise fail(e, verbose) from None
    console.print(res.table())
    raise typer.Exit(EXIT_CHILDREN_FAILED if res.failed else 0)


def _print_sweep_estimate(est: Any, json_out: Path | None) -> None:
    """``medssl sweep --dry-run``: per (fraction, arm) the children's counts and minutes, the pretraining, totals."""
    from collections import defaultdict

    from rich.table import Table

    from medssl.engines.runtime.checkpoint import machine_tag

    table = Table(title=f"medssl sweep --dry-run: study {est.study} on this machine ({machine_tag(est.machine)})")
    for col in ("part", "runs", "steps / validations", "cases (train/val/test/pool)", "minutes each", "done"):
        table.add_column(col, justify="left" if col == "part" else "right")
    if est.pretrain is not None:
        p = est.pretrain["estimate"]
        table.add_row("pretraining", "1", f"{p['total_steps']} / -", f"pool {p['pool']}",
                      f"{est.pretrain['seconds'] / 60:.1f}", "yes" if est.pretrain["status"] == "FINISHED" else "no")
    groups: dict[tuple[float, str], list[Any]] = defaultdict(list)
    for c in est.children:
        groups[(c.fraction, c.init)].append(c)
    for (fraction, arm), cs in groups.items():
        c = cs[0]
        cases = "/".join(str(c.cases.get(k, "-")) for k in ("training", "validation", "test", "pseudo"))
        each = sorted(x.seconds / 60 for x in cs)
        minutes = f"{each[0]:.1f}" if each[-1] - each[0] < 0.05 else f"{each[0]:.1f}–{each[-1]:.1f}"
        table.add_row(f"f{fraction:g} {arm}", str(len(cs)), f"{c.total_steps} / {c.validations}", cases, minutes,
                      f"{sum(x.status == 'FINISHED' for x in cs)}/{len(cs)}")
    console.print(table)
    for i, shape in enumerate(est.shapes):
        t = shape["timing"]
        console.print(f"cost shape {i + 1} (timed on {shape['timed_child']}): {t['step']:.3f} s/step, "
                      f"{t['eval_case']:.2f} s per evaluated case, setup {t['setup']:.1f} s")
    console.print(f"[bold]whole study: {est.total_s / 3600:.2f} h; remaining: {est.remaining_s / 3600:.2f} h[/bold]")
    write_estimate(est, json_out)


def compare(
    study: Annotated[str, typer.Option("--study", help="Study name from the pipeline file.")],
    metric: Annotated[str | None, typer.Option(help="Metric (default: the study's, e.g. test_dice_mean).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <sweep dir>/compare).")] = None,
    config_hash: Annotated[str | None, typer.Option("--config-hash", help="Where children of one fraction/init differ in config: 'latest' or hash(es), comma-separated.")] = None,
    target: Annotated[float | None, typer.Option(help="Metric value the labels-needed line aims at (default: scratch's mean at the largest fraction).")] = None,
    within: Annotated[float, typer.Option(help="Tolerance below the target, in metric units (e.g. 0.01 Dice).")] = 0.0,
    verbose: Verbose = False,
) -> None:
    """Table of mean ± 95 % CI over seeds per fraction and init, paired SSL − scratch, and the labels each init
    needs to reach a Dice / AUC; CSV, PNG and summary metrics to the study's MLflow parent run."""
    from rich.markup import escape

    from medssl.tracking.compare import compare_study

    setup(verbose)
    try:
        r = compare_study(study, tracking_uri=tracking_uri, metric=metric, out_dir=out, config_hash=config_hash,
                          target=target, within=within)
    except (MedsslError, ValueError) as e:
        raise fail(e, verbose) from None
    console.print(r.table)
    if r.machine_note:
        console.print(f"[bold yellow]Note:[/] {escape(r.machine_note)}", soft_wrap=True)
    if r.efficiency is not None:
        console.print(f"[bold]Labels needed:[/] {escape(r.efficiency.sentence())}", soft_wrap=True)
    console.print(
        f"CSV {r.csv_path}\nPNG {r.png_path} (also logged to parent run {r.parent_run_id}, "
        f"with {len(r.parent_metrics)} summary metrics {r.metric}/f<fraction>_<arm>_<stat>)"
    )


runs_app = typer.Typer(help="MLflow runs: replay what dead jobs left in their outage spools.", no_args_is_help=True)


@runs_app.command("sync")
def runs_sync(
    paths: Annotated[list[Path] | None, typer.Argument(help="Run / sweep / study folders or spool files (default: the working directory).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Send everything to this store (default: the store each run was logged to).")] = None,
    verbose: Verbose = False,
) -> None:
    """Replay the MLflow outage spools (mlflow_spool.jsonl) whose job is gone; exit 1 if some stay unsent."""
    from medssl.tracking.spool import replay_spools

    setup(verbose)
    res = replay_spools(paths or [Path.cwd()], tracking_uri=tracking_uri)
    console.print(f"sent {res.n_records} record(s) from {len(res.sent)} spool(s); "
                  f"{len(res.busy)} in use by running jobs, {len(res.failed)} not sent", soft_wrap=True)
    for spool, err in res.failed.items():
        err_console.print(f"[bold red]error:[/] {spool}: {err}", highlight=False, soft_wrap=True)
    if res.failed:
        raise typer.Exit(EXIT_ERROR)
