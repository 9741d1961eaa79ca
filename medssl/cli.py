"""`medssl` command line: thin Typer wrappers over library functions, all on one ``app``.

This module holds the app, the small commands (`ingest`, `split`, `demo`, `version`, `bundle run`) and the table
that registers every command in the order ``medssl --help`` lists them; the others live by what they do:
:mod:`medssl.cli_train` (`pretrain`, `finetune`), :mod:`medssl.cli_studies` (`sweep`, `compare`, `runs sync`) and
:mod:`medssl.cli_deploy` (`predict`, `export`, `register`); shared options, consoles and the error line are in
:mod:`medssl.cli_common`.

Exit codes: 0 success; 1 a `MedsslError` (one red line, `--verbose` for the traceback); 2 bad usage;
3 `ingest` finished but quarantined some inputs (see quarantine.csv); 4 `sweep` finished but some child runs
FAILED.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medssl import cli_deploy, cli_studies, cli_train
from medssl.cli_common import Verbose, console, csv_list, fail, setup
from medssl.errors import MedsslError

__all__ = ["app", "main"]

app = typer.Typer(name="medssl", help="Self-supervised learning for 3D medical images on MONAI.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Files/folders: NIfTI, DICOM (any layout), MSD dataset.json, MedMNIST .npz.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (datalist.json, manifest.csv, quarantine.csv, nifti/).")],
    labels: Annotated[list[Path] | None, typer.Option("--labels", help="Folder(s)/files of label maps, paired with images by name.")] = None,
    workers: Annotated[int, typer.Option(help="Parallel worker processes.", min=1)] = 1,
    tilt: Annotated[str, typer.Option(help="Gantry-tilted DICOM: quarantine | resample.")] = "quarantine",
    uneven: Annotated[str, typer.Option(help="Uneven DICOM slice spacing: quarantine | resample.")] = "quarantine",
    four_d: Annotated[str, typer.Option("--four-d", help="4D DICOM series: split | quarantine.")] = "split",
    copy_nifti: Annotated[bool, typer.Option("--copy-nifti", help="Copy NIfTI inputs under case-id names (hides file names).")] = False,
    salt: Annotated[str | None, typer.Option(envvar="MEDSSL_SALT", help="Secret salt of the case-id hash.")] = None,
    group_by: Annotated[str, typer.Option("--group-by", help="NIfTI patient groups (group_id): case (the case folder, or the file-name case key in imagesTr/-like or flat folders) | parent | file | regex:<pattern> (first group of the pattern in the relative path).")] = "case",
    verbose: Verbose = False,
) -> None:
    """Ingest NIfTI / DICOM / MedMNIST into a PHI-free MONAI datalist, a manifest and a quarantine report."""
    from medssl.data.ingest import IngestOptions
    from medssl.data.ingest import ingest as run_ingest

    setup(verbose)
    try:
        opts = IngestOptions(tilt=tilt, uneven=uneven, four_d=four_d, copy_nifti=copy_nifti, salt=salt,
                             group_by=group_by)
        report = run_ingest(sources, out, labels=labels, workers=workers, options=opts,
                            progress=sys.stderr.isatty())
    except MedsslError as e:
        raise fail(e, verbose) from None
    table = Table(title=f"medssl ingest → {report.out}")
    for col in ("section", "volumes"):
        table.add_column(col)
    for name, n in report.counts.items():
        table.add_row(name, str(n))
    table.add_row("[red]quarantined[/]", str(len(report.quarantined)))
    table.add_row("unchanged (skipped)", str(report.reused))
    if report.warnings:
        table.add_row("[yellow]warnings[/]", f"{len(report.warnings)} (see {report.out / 'warnings.csv'})")
    console.print(table)
    if report.quarantined:
        q = Table(title=f"quarantined ({report.quarantine})", show_lines=False)
        for col in ("path", "reason", "detail"):
            q.add_column(col, overflow="fold")
        for row in report.quarantined[:20]:
            q.add_row(row["path"], row["reason"], row["detail"])
        console.print(q)
        if len(report.quarantined) > 20:
            console.print(f"… and {len(report.quarantined) - 20} more in {report.quarantine}")
    raise typer.Exit(report.exit_code)


def split(
    datalist: Annotated[Path, typer.Argument(help="datalist.json written by `medssl ingest`.")],
    fractions: Annotated[str, typer.Option(help="Label fractions in percent, comma-separated.")] = "1,5,10,25,50,100",
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated.")] = "0,1,2",
    test_fraction: Annotated[float, typer.Option(help="Share of labelled cases in the fixed test set.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Share of labelled cases in each seed's validation set.")] = 0.1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="splits.json path (default: beside the datalist).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Do not split: report on the existing splits.json (counts per split, class and patient group; leakage checks). Exit 1 on a FAIL.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write splits.json (fixed test set, per-seed validation, nested label fractions, patient groups kept
    whole, study-wide pretraining pool) and print its report; `--report` only checks an existing file."""
    from medssl.data.splits import datalist_items, load_splits, split_datalist
    from medssl.data.splits_report import report_lines, report_table, splits_report

    setup(verbose)
    try:
        if report:
            path = out or datalist.with_name("splits.json")
            if not path.exists():
                raise MedsslError(f"{path} does not exist: run `medssl split {datalist}` first (without --report)")
            splits = load_splits(path)
        else:
            path, splits = split_datalist(datalist, fractions=csv_list(fractions, float),
                                          seeds=csv_list(seeds, int), test_fraction=test_fraction,
                                          val_fraction=val_fraction, out=out)
        rep = splits_report(splits, [it for sec in datalist_items(datalist).values() for it in sec])
    except MedsslError as e:
        raise fail(e, verbose) from None
    console.print(report_table(rep, title=f"medssl split {'--report ' if report else '→ '}{path}"))
    for line in report_lines(rep):
        console.print(f"[{'green' if line.startswith('PASS') else 'bold red'}]{line[:4]}[/]{line[4:]}", highlight=False)
    if not rep["ok"]:
        raise fail(MedsslError(f"{path}: leakage check failed (FAIL lines above); re-split with `medssl split`"),
                   verbose)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    sample: Annotated[Path | None, typer.Option(help="Sample data folder (default: the one shipped in examples/data).")] = None,
    verbose: Verbose = False,
) -> None:
    """The main job end-to-end on the small real sample shipped in the repository."""
    from medssl.demo import run_demo

    setup(verbose)
    try:
        run_demo(out, sample=sample, console=console)
    except MedsslError as e:
        raise fail(e, verbose) from None


def version() -> None:
    """Print medssl, MONAI and torch versions."""
    import monai
    import torch

    import medssl

    console.print(f"medssl {medssl.__version__}  monai {monai.__version__}  torch {torch.__version__}")


# ---------------------------------------------------------------------------------------- bundle run (issue 11)
bundle_app = typer.Typer(help="MONAI bundles (bundles/*): run a config with checked overrides.", no_args_is_help=True)


@bundle_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bundle_run(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Bundle config, e.g. bundles/ssl_pretrain/configs/train.yaml.")],
    meta: Annotated[Path | None, typer.Option("--meta", help="metadata.json (default: the one beside CONFIG).")] = None,
    variant: Annotated[list[Path] | None, typer.Option("--variant", help="Config merged over CONFIG, in order (multi_gpu_train.yaml, evaluate.yaml).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override an id, dotted: --set optimizer.lr=1e-4 (= MONAI's --optimizer#lr 1e-4, also accepted after --).")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Workflow id to run (default: run, else training).")] = None,
    verbose: Verbose = False,
) -> None:
    """Run a MONAI bundle config; a missing override id or an unknown _target_ is one error naming the key and
    file. MONAI-style overrides go after `--`: medssl bundle run CONFIG -- --optimizer#lr 1e-4."""
    from medssl.bundles.run import bundle_overrides, run_bundle_config

    setup(verbose)
    try:
        values = bundle_overrides(overrides or [], ctx.args)
        run_bundle_config([config, *(variant or [])], meta_file=meta, overrides=values, run_id=run_id)
    except MedsslError as e:
        raise fail(e, verbose) from None


# ------------------------------------------------------------------------------------------ the command table
# every command, in the order `medssl --help` lists them (tests/test_cli_layout.py holds the list)
for _command in (
    ingest, split, cli_train.pretrain, cli_train.finetune, cli_studies.sweep, cli_studies.compare, demo,
    cli_deploy.predict, cli_deploy.export, cli_deploy.register, version,
):  # fmt: skip
    app.command()(_command)
del _command
app.add_typer(cli_studies.runs_app, name="runs")
app.add_typer(bundle_app, name="bundle")


def main() -> None:  # pragma: no cover - console-script convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
