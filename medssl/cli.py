"""`medssl` command line: thin Typer wrappers over library functions.

Exit codes: 0 success; 1 a `MedsslError` (one red line, `--verbose` for the traceback); 2 bad usage;
3 `ingest` finished but quarantined some inputs (see quarantine.csv); 4 `sweep` finished but some child runs
FAILED.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medssl.errors import MedsslError

__all__ = ["app", "main"]

app = typer.Typer(name="medssl", help="Self-supervised learning for 3D medical images on MONAI.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("medssl")

EXIT_ERROR, EXIT_QUARANTINED, EXIT_CHILDREN_FAILED = 1, 3, 4

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")]


def _setup(verbose: bool) -> None:
    from medssl.log import setup_logging

    setup_logging(verbose, err_console)


def _fail(e: Exception, verbose: bool) -> typer.Exit:
    if verbose:
        err_console.print_exception()
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    return typer.Exit(getattr(e, "exit_code", EXIT_ERROR))  # medssl.engines.runtime.preemption.Preempted: 75


def _csv_list(value: str, cast: type) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: expected a comma-separated list of {cast.__name__}") from e


@app.command()
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

    _setup(verbose)
    try:
        opts = IngestOptions(tilt=tilt, uneven=uneven, four_d=four_d, copy_nifti=copy_nifti, salt=salt,
                             group_by=group_by)
        report = run_ingest(sources, out, labels=labels, workers=workers, options=opts,
                            progress=sys.stderr.isatty())
    except MedsslError as e:
        raise _fail(e, verbose) from None
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


@app.command()
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

    _setup(verbose)
    try:
        if report:
            path = out or datalist.with_name("splits.json")
            if not path.exists():
                raise MedsslError(f"{path} does not exist: run `medssl split {datalist}` first (without --report)")
            splits = load_splits(path)
        else:
            path, splits = split_datalist(datalist, fractions=_csv_list(fractions, float),
                                          seeds=_csv_list(seeds, int), test_fraction=test_fraction,
                                          val_fraction=val_fraction, out=out)
        rep = splits_report(splits, [it for sec in datalist_items(datalist).values() for it in sec])
    except MedsslError as e:
        raise _fail(e, verbose) from None
    console.print(report_table(rep, title=f"medssl split {'--report ' if report else '→ '}{path}"))
    for line in report_lines(rep):
        console.print(f"[{'green' if line.startswith('PASS') else 'bold red'}]{line[:4]}[/]{line[4:]}", highlight=False)
    if not rep["ok"]:
        raise _fail(MedsslError(f"{path}: leakage check failed (FAIL lines above); re-split with `medssl split`"),
                    verbose)


@app.command()
def pretrain(
    datalist: Annotated[Path | None, typer.Option(help="datalist.json of the unlabeled pool (from `medssl ingest`).")] = None,
    method: Annotated[str | None, typer.Option(help="SSL method: simclr, triplet, rotation, mae, genesis, swin, vicreg, byol, spark.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder: swinvit, vit, segresnet, segresnet_unet, resnet3d, unet, monai_unet.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (checkpoints, encoder.pt/.json).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (PretrainConfig fields); options given here win.")] = None,
    splits: Annotated[Path | None, typer.Option(help="splits.json: its validation/test cases are kept out of pretraining.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Volumes per micro-batch.")] = None,
    roi: Annotated[str | None, typer.Option(help="View size D,H,W in voxels, e.g. 32,32,32.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of init, data order and augmentation.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to resume exactly (e.g. OUT/checkpoints/last.pt).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set lr=3e-4 --set method_kwargs.temperature=0.2.")] = None,
    verbose: Verbose = False,
) -> None:
    """Pretrain an encoder on unlabeled volumes (tracked in MLflow; exact resume from checkpoints)."""
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.engine import run_pretraining

    _setup(verbose)
    given = {"datalist": datalist, "method": method, "encoder": encoder, "out_dir": out, "splits": splits,
             "total_steps": steps, "batch_size": batch_size, "device": device, "seed": seed,
             "roi_size": _csv_list(roi, int) if roi else None}
    cli_values = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    try:
        if config is not None:
            cfg = PretrainConfig.from_yaml(config, overrides=cli_values)
        else:
            cfg = PretrainConfig.from_dict(cli_values)
        if overrides:
            cfg = PretrainConfig.from_dict(cfg.to_dict(), overrides=list(overrides))
        if not cfg.datalist:
            raise MedsslError("no datalist: pass --datalist or set `datalist` in --config")
        result = run_pretraining(cfg, resume=resume, progress=sys.stderr.isatty())
    except MedsslError as e:
        raise _fail(e, verbose) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    table = Table(title=f"medssl pretrain → {result.out_dir}")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    hist = result.loss_history
    rows = [("steps run", len(hist)), ("first loss", f"{hist[0][1]:.4f}" if hist else "-"),
            ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-"),
            ("skipped non-finite steps", len(result.skipped_steps)),
            ("skipped volumes", len(result.skipped_volumes)), ("encoder", result.encoder_path),
            ("how to load", result.encoder_json), ("last checkpoint", result.last_checkpoint),
            ("MLflow run", result.run_id or "tracking disabled")]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


@app.command()
def finetune(
    datalist: Annotated[Path | None, typer.Option(help="datalist.json (from `medssl ingest`).")] = None,
    splits: Annotated[Path | None, typer.Option(help="splits.json (from `medssl split`).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Labelled fraction in percent (a key of splits.json), e.g. 10.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed (validation set, fraction subset) and training seed.")] = None,
    init: Annotated[str | None, typer.Option(help="scratch | ssl:PATH_OR_MLFLOW_URI (encoder.pt, run folder, runs:/..., models:/...).")] = None,
    task: Annotated[str | None, typer.Option(help="segmentation | classification.")] = None,
    network: Annotated[str | None, typer.Option(help="SwinUNETR | UNETR | SegResNet | BasicUNet (Models Genesis) | ResNet.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (checkpoints/best.pt, results.json).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (FinetuneConfig fields); options given here win.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Max epochs.")] = None,
    roi: Annotated[str | None, typer.Option(help="Crop / sliding-window size D,H,W in voxels, e.g. 32,32,32.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto.")] = None,
    resume: Annotated[str | None, typer.Option(help="'auto' (continue OUT/checkpoints/last.pt if present) or a last.pt path.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set lr=1e-4 --set llrd=0.75.")] = None,
    verbose: Verbose = False,
) -> None:
    """Finetune on one label fraction (scratch or SSL init); best-on-validation weights tested once."""
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.engine import run_finetune

    _setup(verbose)
    given = {"datalist": datalist, "splits": splits, "fraction": fraction, "seed": seed, "init": init,
             "task": task, "network": network, "out_dir": out, "max_epochs": epochs, "device": device,
             "roi_size": _csv_list(roi, int) if roi else None}
    cli_values = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    try:
        cfg = FinetuneConfig.from_yaml(config, overrides=cli_values) if config else FinetuneConfig.from_dict(cli_values)
        if overrides:
            cfg = FinetuneConfig.from_dict(cfg.to_dict(), overrides=list(overrides))
        if not cfg.datalist or not cfg.splits:
            raise MedsslError("pass --datalist and --splits (or set them in --config)")
        result = run_finetune(cfg, resume=resume, progress=sys.stderr.isatty())
    except MedsslError as e:  # TransferError's message holds the transfer report table
        raise _fail(e, verbose) from None
    table = Table(title=f"medssl finetune → {result.out_dir} ({result.status}, {result.epochs_run} epochs)")
    table.add_column("metric")
    table.add_column("validation (best)")
    table.add_column("test")
    for k in result.test_metrics:
        table.add_row(k, f"{result.best_val.get(k, float('nan')):.4f}", f"{result.test_metrics[k]:.4f}")
    console.print(table)
    if result.transfer is not None:
        part = "encoder and decoder" if result.transfer.get("n_matched_decoder") else "encoder"
        console.print(f"SSL weights loaded: {100 * result.transfer['share']:.1f} % of the {part}")
    console.print(f"best checkpoint: {result.best_checkpoint}  MLflow run: {result.run_id or 'tracking disabled'}")


@app.command()
def sweep(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. pipelines/label_efficiency.yaml.")],
    new: Annotated[bool, typer.Option("--new", help="New parent run even if the study exists (default: resume it; a changed config or data is refused there, naming the keys).")] = False,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override key.sub=value (repeatable), e.g. --set 'seeds=[0]'.")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit to SLURM: pretraining, then one array task per child (afterok); see medssl.cluster.sweep_jobs.")] = False,
    emit_jobs: Annotated[Path | None, typer.Option("--emit-jobs", help="Only write the SLURM scripts (+ submit.sh) into this folder.")] = None,
    child: Annotated[str | None, typer.Option("--child", help="Run only 'pretrain' or child N (0-based): what a SLURM array task runs.")] = None,
    parent_run: Annotated[str | None, typer.Option("--parent-run", help="MLflow parent run id to log into (with --child).")] = None,
    verbose: Verbose = False,
) -> None:
    """Pretrain once, then finetune each (fraction, init, seed) as an MLflow child run of one study.

    Exit code 4: the sweep finished but some children FAILED (their errors are in MLflow tag medssl.error).
    With jobs of an earlier --slurm submission still pending or running, it only shows their status.
    """
    from medssl.engines.studies.sweep import run_sweep

    _setup(verbose)
    sets = list(overrides or [])
    try:
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
        raise _fail(e, verbose) from None
    console.print(res.table())
    raise typer.Exit(EXIT_CHILDREN_FAILED if res.failed else 0)


@app.command()
def compare(
    study: Annotated[str, typer.Option("--study", help="Study name from the pipeline file.")],
    metric: Annotated[str | None, typer.Option(help="Metric (default: the study's, e.g. test_dice_mean).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <sweep dir>/compare).")] = None,
    config_hash: Annotated[str | None, typer.Option("--config-hash", help="Where children of one fraction/init differ in config: 'latest' or hash(es), comma-separated.")] = None,
    verbose: Verbose = False,
) -> None:
    """Table of mean ± 95 % CI over seeds per fraction and init, paired SSL − scratch; CSV, PNG and summary
    metrics to the study's MLflow parent run."""
    from medssl.tracking.compare import compare_study

    _setup(verbose)
    try:
        r = compare_study(study, tracking_uri=tracking_uri, metric=metric, out_dir=out, config_hash=config_hash)
    except MedsslError as e:
        raise _fail(e, verbose) from None
    console.print(r.table)
    console.print(
        f"CSV {r.csv_path}\nPNG {r.png_path} (also logged to parent run {r.parent_run_id}, "
        f"with {len(r.parent_metrics)} summary metrics {r.metric}/f<fraction>_<arm>_<stat>)"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo_out"),
    sample: Annotated[Path | None, typer.Option(help="Sample data folder (default: the one shipped in examples/data).")] = None,
    verbose: Verbose = False,
) -> None:
    """The main job end-to-end on the small real sample shipped in the repository."""
    from medssl.demo import run_demo

    _setup(verbose)
    try:
        run_demo(out, sample=sample, console=console)
    except MedsslError as e:
        raise _fail(e, verbose) from None


# ----------------------------------------------------------------------------------------- predict (issue 10)
@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="Finetune checkpoint (best.pt), run folder, runs:/… or models:/… URI; an exported file for --backend torchscript|onnx.")],
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI files, DICOM series folders, or folders of either.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (<case>_seg.nii.gz, predict_report.json).")],
    backend: Annotated[str, typer.Option(help="torch | torchscript | onnx.")] = "torch",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
    batch: Annotated[int | None, typer.Option(help="Sliding windows per forward pass (default: the recipe's).", min=1)] = None,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Average over test-time flips (only axes the training flipped).")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write <case>_prob.nii.gz (softmax) and <case>_uncertainty.nii.gz (normalised entropy).")] = False,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="DICOM inputs: also write <case>_seg.dcm (DICOM SEG referencing the series).")] = False,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store for runs:/ and models:/ URIs.")] = None,
    verbose: Verbose = False,
) -> None:
    """Segment NIfTI files / DICOM series with a finetuned model; label maps on each input's own grid.

    Exit code 1 when any input failed (reported with its reason and skipped; the others are written).
    """
    from medssl.deploy.predict import predict as run_predict

    _setup(verbose)
    try:
        res = run_predict(model, inputs, out, backend=backend, device=device, batch=batch, tta=tta,
                          probabilities=probabilities, dicom_seg=dicom_seg, progress=sys.stderr.isatty(),
                          tracking_uri=tracking_uri)
    except MedsslError as e:
        raise _fail(e, verbose) from None
    table = Table(title=f"medssl predict → {res.out_dir} ({len(res.ok)} written, {len(res.failed)} failed)")
    for col in ("case", "status", "output / reason"):
        table.add_column(col, overflow="fold")
    for row in res.cases:
        ok = row["status"] == "ok"
        what = row.get("outputs", {}).get("seg", "") if ok else f"{row['reason']}: {row['detail']}"
        color = "green" if ok else "yellow" if row["status"] == "skipped" else "red"
        table.add_row(row.get("case", row["input"]), f"[{color}]{row['status']}[/]", what)
    console.print(table)
    console.print(f"report: {res.report_path}")
    raise typer.Exit(res.exit_code)


# ------------------------------------------------------------------------------------------ export (issue 10)
@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Finetuned model: checkpoints/best.pt, run folder, runs:/<id> or models:/<name>@<alias>.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (model.ts, model.onnx, recipe.json, export_check.json).")] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Also (or only) write a MONAI bundle zip (bundles/finetune_seg configs + models/model.pt + recipe).")] = None,
    format: Annotated[str, typer.Option("--format", help="Comma-separated: torchscript, onnx.")] = "torchscript,onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset.", min=7)] = 18,
    volume: Annotated[Path | None, typer.Option(help="Real NIfTI volume of the numerical check (default: the first image of the model's datalist).")] = None,
    method: Annotated[str, typer.Option(help="TorchScript: script | trace.")] = "script",
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store for runs:/ and models:/ URIs.")] = None,
    verbose: Verbose = False,
) -> None:
    """Export a finetuned model to TorchScript / ONNX, each checked against the eager model on a real volume."""
    from medssl.deploy.export import MAX_ABS_DIFF, MIN_ARGMAX_AGREEMENT, export_model

    _setup(verbose)
    if out is None and bundle is None:
        raise typer.BadParameter("give --out (TorchScript/ONNX) and/or --bundle (MONAI bundle zip)")
    try:
        if bundle is not None:
            from medssl.deploy.bundle import write_bundle_zip

            console.print(f"bundle: {write_bundle_zip(model, bundle, tracking_uri=tracking_uri)}")
            if out is None:
                return
        res = export_model(model, out, formats=_csv_list(format, str), opset=opset, volume=volume, method=method,
                           tracking_uri=tracking_uri)
    except MedsslError as e:
        raise _fail(e, verbose) from None
    table = Table(title=f"medssl export → {out} (max |diff| <= {MAX_ABS_DIFF:g}, argmax >= {MIN_ARGMAX_AGREEMENT:.2%})")
    for col in ("format", "file", "max |logit diff|", "argmax agreement", "check"):
        table.add_column(col)
    for fmt, c in res.checks.items():
        table.add_row(fmt, c["file"], f"{c['max_abs_diff']:.2e}", f"{c['argmax_agreement']:.6f}",
                      "[green]passed[/]" if c["passed"] else "[red]FAILED[/]")
    console.print(table)
    console.print(f"recipe: {res.recipe_path}  check: {res.check_path}")


# ---------------------------------------------------------------------------------------- register (issue 10)
@app.command()
def register(
    run: Annotated[str, typer.Argument(help="Finetune run: MLflow run id (or runs:/<id>), run folder or checkpoint file.")],
    name: Annotated[str, typer.Option("--name", help="Registered model name (created if missing).")],
    alias: Annotated[str | None, typer.Option(help="Alias set on the new version (serve models:/NAME@ALIAS).")] = "champion",
    example: Annotated[Path | None, typer.Option(help="NIfTI volume of the input example (default: the run's first datalist image).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking + registry store.")] = None,
    verbose: Verbose = False,
) -> None:
    """Log a finetuned segmentation run as an MLflow pyfunc model, register a version and set its alias."""
    from medssl.deploy.registry import register_model

    _setup(verbose)
    try:
        res = register_model(run, name, alias=alias or None, example=example, tracking_uri=tracking_uri)
    except MedsslError as e:
        raise _fail(e, verbose) from None
    console.print(f"registered [bold]{res.name}[/] version {res.version} (run {res.run_id}) → {res.model_uri}")
    console.print(f"serve: mlflow models serve -m {res.model_uri} --env-manager local -p 5001", soft_wrap=True)


# ---------------------------------------------------------------------------------------- runs sync (issue 11)
runs_app = typer.Typer(help="MLflow runs: replay what dead jobs left in their outage spools.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("sync")
def runs_sync(
    paths: Annotated[list[Path] | None, typer.Argument(help="Run / sweep / study folders or spool files (default: the working directory).")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Send everything to this store (default: the store each run was logged to).")] = None,
    verbose: Verbose = False,
) -> None:
    """Replay the MLflow outage spools (mlflow_spool.jsonl) whose job is gone; exit 1 if some stay unsent."""
    from medssl.tracking.spool import replay_spools

    _setup(verbose)
    res = replay_spools(paths or [Path.cwd()], tracking_uri=tracking_uri)
    console.print(f"sent {res.n_records} record(s) from {len(res.sent)} spool(s); "
                  f"{len(res.busy)} in use by running jobs, {len(res.failed)} not sent", soft_wrap=True)
    for spool, err in res.failed.items():
        err_console.print(f"[bold red]error:[/] {spool}: {err}", highlight=False, soft_wrap=True)
    if res.failed:
        raise typer.Exit(EXIT_ERROR)


# ---------------------------------------------------------------------------------------- bundle run (issue 11)
bundle_app = typer.Typer(help="MONAI bundles (bundles/*): run a config with checked overrides.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


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

    _setup(verbose)
    try:
        values = bundle_overrides(overrides or [], ctx.args)
        run_bundle_config([config, *(variant or [])], meta_file=meta, overrides=values, run_id=run_id)
    except MedsslError as e:
        raise _fail(e, verbose) from None


@app.command()
def version() -> None:
    """Print medssl, MONAI and torch versions."""
    import monai
    import torch

    import medssl

    console.print(f"medssl {medssl.__version__}  monai {monai.__version__}  torch {torch.__version__}")


def main() -> None:  # pragma: no cover - console-script convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
