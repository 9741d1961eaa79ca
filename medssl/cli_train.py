"""`medssl pretrain` and `medssl finetune`: thin Typer wrappers over
:func:`medssl.engines.pretrain.engine.run_pretraining` and :func:`medssl.engines.finetune.engine.run_finetune`.

Registered on the one ``app`` by :mod:`medssl.cli` (which lists every command); options given on the command line
win over ``--config`` and ``--set`` overrides apply last.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medssl.cli_common import Verbose, console, csv_list, fail, setup, write_estimate
from medssl.errors import MedsslError

__all__ = ["finetune", "pretrain"]


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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build, check and time the run on this machine (a few steps, one monitor probe); train and write nothing.")] = False,
    time_steps: Annotated[int, typer.Option(help="--dry-run: optimizer steps timed.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="--dry-run: also write the estimate as JSON here.")] = None,
    verbose: Verbose = False,
) -> None:
    """Pretrain an encoder on unlabeled volumes (tracked in MLflow; exact resume from checkpoints)."""
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.engine import run_pretraining

    setup(verbose)
    given = {"datalist": datalist, "method": method, "encoder": encoder, "out_dir": out, "splits": splits,
             "total_steps": steps, "batch_size": batch_size, "device": device, "seed": seed,
             "roi_size": csv_list(roi, int) if roi else None}
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
        if dry_run:
            from medssl.engines.pretrain.estimate import estimate_pretraining

            _print_pretrain_estimate(estimate_pretraining(cfg, time_steps=time_steps), json_out)
            return
        result = run_pretraining(cfg, resume=resume, progress=sys.stderr.isatty())
    except MedsslError as e:
        raise fail(e, verbose) from None
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


def finetune(
    datalist: Annotated[Path | None, typer.Option(help="datalist.json (from `medssl ingest`).")] = None,
    splits: Annotated[Path | None, typer.Option(help="splits.json (from `medssl split`).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Labelled fraction in percent (a key of splits.json), e.g. 10.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed (validation set, fraction subset) and training seed.")] = None,
    init: Annotated[str | None, typer.Option(help="scratch | ssl:PATH_OR_MLFLOW_URI (encoder.pt, run folder, runs:/..., models:/...).")] = None,
    task: Annotated[str | None, typer.Option(help="segmentation | classification.")] = None,
    network: Annotated[str | None, typer.Option(help="SwinUNETR | UNETR | SegResNet | BasicUNet (Models Genesis) | UNet (SparK) | ResNet (classification).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (checkpoints/best.pt, results.json).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (FinetuneConfig fields); options given here win.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Max epochs.")] = None,
    roi: Annotated[str | None, typer.Option(help="Crop / sliding-window size D,H,W in voxels, e.g. 32,32,32.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto.")] = None,
    resume: Annotated[str | None, typer.Option(help="'auto' (continue OUT/checkpoints/last.pt if present) or a last.pt path.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set lr=1e-4 --set llrd=0.75.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan, check and time the run on this machine (a few steps, a few validation cases); train and write nothing.")] = False,
    time_steps: Annotated[int, typer.Option(help="--dry-run: optimizer steps timed.")] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="--dry-run: also write the estimate as JSON here.")] = None,
    verbose: Verbose = False,
) -> None:
    """Finetune on one label fraction (scratch or SSL init); best-on-validation weights tested once."""
    from medssl.engines.finetune.config import FinetuneConfig
    from medssl.engines.finetune.engine import run_finetune

    setup(verbose)
    given = {"datalist": datalist, "splits": splits, "fraction": fraction, "seed": seed, "init": init,
             "task": task, "network": network, "out_dir": out, "max_epochs": epochs, "device": device,
             "roi_size": csv_list(roi, int) if roi else None}
    cli_values = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    try:
        cfg = FinetuneConfig.from_yaml(config, overrides=cli_values) if config else FinetuneConfig.from_dict(cli_values)
        if overrides:
            cfg = FinetuneConfig.from_dict(cfg.to_dict(), overrides=list(overrides))
        if not cfg.datalist or not cfg.splits:
            raise MedsslError("pass --datalist and --splits (or set them in --config)")
        if dry_run:
            from medssl.engines.finetune.estimate import estimate_run

            _print_estimate(estimate_run(cfg, time_steps=time_steps), json_out)
            return
        result = run_finetune(cfg, resume=resume, progress=sys.stderr.isatty())
    except MedsslError as e:  # TransferError's message holds the transfer report table
        raise fail(e, verbose) from None
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


def _time_table(title: str, setup_label: str, setup_s: float) -> Table:
    """A --dry-run time table (part, measured, estimate) opened by its setup row."""
    table = Table(title=title)
    table.add_column("part")
    table.add_column("measured")
    table.add_column("estimate", justify="right")
    table.add_row(setup_label, f"{setup_s:.1f} s", f"{setup_s / 60:.1f} min")
    return table


def _print_pretrain_estimate(est: Any, json_out: Path | None) -> None:
    """``medssl pretrain --dry-run``: what the run trains and its time on this machine."""
    from medssl.engines.runtime.checkpoint import machine_tag

    c, t = est.config, est.timing
    table = _time_table(f"medssl pretrain --dry-run: {c['method']} on {c['encoder']}, {est.pool} pool volumes "
                        f"({est.device}; {machine_tag(est.machine)})", "setup (pool, model, cache)", t["setup"])
    table.add_row("training", f"{t['step']:.3f} s/step ({int(t['steps_timed'])} timed; batch {c['batch_size']} × "
                  f"{'×'.join(map(str, c['roi_size']))}, {est.parameters / 1e6:.2f} M parameters)",
                  f"{est.total_steps} steps: {t['training'] / 60:.1f} min")
    if est.probes:
        table.add_row("kNN monitor", f"{t['probe']:.1f} s/probe", f"{est.probes} probes: {t['monitor'] / 60:.1f} min")
    if est.checkpoints:
        table.add_row("checkpoints", f"{t['checkpoint']:.2f} s each",
                      f"{est.checkpoints} writes: {t['checkpointing'] / 60:.1f} min")
    table.add_row("[bold]total[/bold]", "", f"[bold]{est.total_minutes:.1f} min[/bold]")
    console.print(table)
    write_estimate(est, json_out)


def _print_estimate(est: Any, json_out: Path | None) -> None:
    """``medssl finetune --dry-run``: the resolved recipe, the cases and the time on this machine."""
    from medssl.engines.runtime.checkpoint import machine_tag

    c, t = est.config, est.timing
    recipe = Table(title=f"medssl finetune --dry-run: {c['task']}, fraction {c['fraction']:g} %, seed {c['seed']}, "
                         f"init {c['init']}")
    recipe.add_column("field")
    recipe.add_column("value")
    rows = [("network", f"{c['network']} {c['network_kwargs']} ({est.parameters / 1e6:.2f} M trainable parameters)"),
            ("patch (roi_size)", "×".join(map(str, c["roi_size"]))),
            ("batch", f"{c['batch_size']} volume(s) × {c['num_samples']} crop(s), sampling {c['sampling']}"),
            ("spacing / normalisation", f"{c['target_spacing']} mm / {c['normalisation']}"),
            ("classes (out_channels)", str(c["out_channels"])),
            ("cases", ", ".join(f"{k} {v}" for k, v in est.cases.items())),
            ("schedule", f"{est.total_steps} steps ({est.steps_per_epoch} per epoch), lr {c['lr']:g}, "
                         f"{est.validations} validations"),
            ("planned", "yes (plan.json)" if est.plan else "no 'auto' field")]
    for row in rows:
        recipe.add_row(*row)
    console.print(recipe)
    timing = _time_table(f"time on this machine ({est.device}; {machine_tag(est.machine)})",
                         "setup (plan, model, cache)", t["setup"])
    if "teacher_case" in t:
        timing.add_row("teacher labels the pool", f"{t['teacher_case']:.2f} s/volume", f"{t['labelling'] / 60:.1f} min")
    timing.add_row("training", f"{t['step']:.3f} s/step ({int(t['steps_timed'])} timed)", f"{t['training'] / 60:.1f} min")
    timing.add_row("validation", f"{t['eval_case']:.2f} s/case ({int(t['eval_cases_timed'])} timed)",
                   f"{t['validation'] / 60:.1f} min")
    timing.add_row("test", f"{est.cases['test']} cases", f"{t['test'] / 60:.1f} min")
    timing.add_row("[bold]total[/bold]", "", f"[bold]{est.total_minutes:.1f} min[/bold]")
    console.print(timing)
    write_estimate(est, json_out)
