"""`medssl predict`, `medssl export` and `medssl register` (issue 10): thin Typer wrappers over
:func:`medssl.deploy.predict.predict`, :func:`medssl.deploy.export.export_model` /
:func:`medssl.deploy.bundle.write_bundle_zip` and :func:`medssl.deploy.registry.register_model`.

Registered on the one ``app`` by :mod:`medssl.cli`; serving is MLflow's own ``mlflow models serve``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medssl.cli_common import Verbose, console, csv_list, fail, setup
from medssl.errors import MedsslError

__all__ = ["export", "predict", "register"]


def predict(
    model: Annotated[str, typer.Argument(help="Finetune checkpoint (best.pt), run folder, runs:/… or models:/… URI; an exported file for --backend torchscript|onnx.")],
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI files, DICOM series folders, or folders of either.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (<case>_seg.nii.gz, predict_report.json).")],
    ensemble: Annotated[list[str] | None, typer.Option("--ensemble", help="Another model to average with MODEL (softmax mean; repeat for more, e.g. a study's seeds). Members must preprocess alike.")] = None,
    backend: Annotated[str, typer.Option(help="torch | torchscript | onnx.")] = "torch",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
    batch: Annotated[int | None, typer.Option(help="Sliding windows per forward pass (default: the recipe's).", min=1)] = None,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Average over test-time flips (only axes the training flipped).")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write <case>_prob.nii.gz (softmax) and <case>_uncertainty.nii.gz (normalised entropy).")] = False,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="DICOM inputs: also write <case>_seg.dcm (DICOM SEG referencing the series).")] = False,
    tracking_uri: Annotated[str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store for runs:/ and models:/ URIs.")] = None,
    verbose: Verbose = False,
) -> None:
    """Segment NIfTI files / DICOM series with a finetuned model (or an ensemble: --ensemble); label maps on each
    input's own grid.

    Exit code 1 when any input failed (reported with its reason and skipped; the others are written).
    """
    from medssl.deploy.predict import predict as run_predict

    setup(verbose)
    try:
        res = run_predict([model, *ensemble] if ensemble else model, inputs, out, backend=backend, device=device, batch=batch, tta=tta,
                          probabilities=probabilities, dicom_seg=dicom_seg, progress=sys.stderr.isatty(),
                          tracking_uri=tracking_uri)
    except MedsslError as e:
        raise fail(e, verbose) from None
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

    setup(verbose)
    if out is None and bundle is None:
        raise typer.BadParameter("give --out (TorchScript/ONNX) and/or --bundle (MONAI bundle zip)")
    try:
        if bundle is not None:
            from medssl.deploy.bundle import write_bundle_zip

            console.print(f"bundle: {write_bundle_zip(model, bundle, tracking_uri=tracking_uri)}")
            if out is None:
                return
        res = export_model(model, out, formats=csv_list(format, str), opset=opset, volume=volume, method=method,
                           tracking_uri=tracking_uri)
    except MedsslError as e:
        raise fail(e, verbose) from None
    table = Table(title=f"medssl export → {out} (max |diff| <= {MAX_ABS_DIFF:g}, argmax >= {MIN_ARGMAX_AGREEMENT:.2%})")
    for col in ("format", "file", "max |logit diff|", "argmax agreement", "check"):
        table.add_column(col)
    for fmt, c in res.checks.items():
        table.add_row(fmt, c["file"], f"{c['max_abs_diff']:.2e}", f"{c['argmax_agreement']:.6f}",
                      "[green]passed[/]" if c["passed"] else "[red]FAILED[/]")
    console.print(table)
    console.print(f"recipe: {res.recipe_path}  check: {res.check_path}")


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

    setup(verbose)
    try:
        res = register_model(run, name, alias=alias or None, example=example, tracking_uri=tracking_uri)
    except MedsslError as e:
        raise fail(e, verbose) from None
    console.print(f"registered [bold]{res.name}[/] version {res.version} (run {res.run_id}) → {res.model_uri}")
    console.print(f"serve: mlflow models serve -m {res.model_uri} --env-manager local -p 5001", soft_wrap=True)
