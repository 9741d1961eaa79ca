"""`make demo` / `medssl demo`: the main job end-to-end on the small real sample shipped in the repository.

The story: ingest (MSD hippocampus NIfTI + a JPEG 2000 CT DICOM series) → label-fraction splits → a short SSL
pretraining → a tiny label-efficiency sweep (2 fractions × {scratch, ssl} × 1 seed, MLflow parent/child runs) →
the comparison table + PNG, all visible in MLflow → ``predict`` with the best SSL-initialised model of the
largest label fraction on a held-back case (`HELD_BACK_CASE`), scored against its label. Sized for a few
minutes on 2 CPU cores.

The shipped CT DICOM series is ingested only: the demo finetunes no CT model, so nothing predicts on it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medssl.errors import MedsslError

__all__ = ["run_demo", "default_sample_dir", "DEMO_FINETUNE_AUGMENT", "HELD_BACK_CASE", "stage_sample",
           "predict_held_back"]

log = logging.getLogger(__name__)

#: finetuning augmentation of the demo sweep: left/right flips only (array axis 0 after RAS orientation);
#: anterior (class 1) vs posterior (class 2) hippocampus lies along axis 1, which a flip would swap
DEMO_FINETUNE_AUGMENT = {"flip_prob": 0.5, "flip_axes": [0]}

#: the labelled sample case kept out of ingest, splits, pretraining and finetuning, so that the demo's closing
#: ``predict`` runs on a scan no model has seen (like a new patient's) and its Dice is an honest held-out score.
#: Any labelled case would do (splits are by hash); the last one of ``imagesTr`` is taken.
HELD_BACK_CASE = "hippocampus_089"


def default_sample_dir() -> Path:
    """``examples/data`` of the source checkout (the demo needs the repository, not only the wheel)."""
    return Path(__file__).resolve().parents[1] / "examples" / "data"


def run_demo(out: str | Path, *, sample: str | Path | None = None, console: Console | None = None,
             pretrain_steps: int = 300, finetune_steps: int = 300, tracking_uri: str | None = None) -> dict:
    """Run the demo into ``out``; returns a dict of the produced paths and counts (``predict``: the held-back
    case's prediction, see `predict_held_back`).

    Args:
        out: output folder.
        sample: sample data folder (default: ``examples/data`` of the checkout).
        console: rich console for the tables.
        pretrain_steps: SSL pretraining steps (0 skips pretraining and the sweep).
        finetune_steps: optimizer steps of each finetuning run of the sweep (0 skips the sweep).
        tracking_uri: MLflow store (default ``$MLFLOW_TRACKING_URI`` or ``./mlruns.db``).

    Raises:
        MedsslError: the sample data is missing or a stage fails.
    """
    from medssl.data.ingest import IngestOptions, ingest
    from medssl.data.splits import split_datalist, splits_table

    console = console or Console()
    sample = Path(sample) if sample else default_sample_dir()
    hippo, ct = sample / "hippocampus", sample / "ct_dicom"
    for p in (hippo, ct):
        if not p.exists():
            raise MedsslError(f"demo sample {p} not found (run from a source checkout or pass --sample)")
    out = Path(out)
    t0 = time.perf_counter()
    results: dict = {}
    staged = stage_sample(hippo, out / "sample" / "hippocampus", HELD_BACK_CASE)
    with console.status("ingesting the MRI sample (MSD hippocampus) …"):
        mri = ingest([staged], out / "hippocampus", options=IngestOptions(salt="medssl-demo"))
    with console.status("converting the CT DICOM series (JPEG 2000) …"):
        ct_rep = ingest([ct], out / "ct", options=IngestOptions(salt="medssl-demo"))
    table = Table(title="1. ingest")
    for col in ("dataset", "training", "unlabeled", "quarantined", "datalist"):
        table.add_column(col)
    for name, rep in (("hippocampus MRI", mri), ("CT DICOM", ct_rep)):
        table.add_row(name, str(rep.counts["training"]), str(rep.counts["unlabeled"]), str(len(rep.quarantined)),
                      str(rep.datalist))
    console.print(table)
    if mri.quarantined or ct_rep.quarantined:
        raise MedsslError(f"demo inputs were quarantined: {mri.quarantined + ct_rep.quarantined}")
    splits_path, splits = split_datalist(mri.datalist, fractions=[10, 25, 50, 100], seeds=[0, 1])
    console.print(splits_table(splits, title=f"2. split → {splits_path}"))
    results.update(hippocampus=mri, ct=ct_rep, splits=splits_path)
    if pretrain_steps > 0:
        results["pretrain"] = _pretrain(out, mri.datalist, splits_path, pretrain_steps, tracking_uri, console)
        if finetune_steps > 0:
            results["sweep"], results["compare"] = _sweep(
                out, mri.datalist, splits_path, results["pretrain"].encoder_path, finetune_steps, tracking_uri,
                console)
            child = _best_ssl_child(results["sweep"])
            if child is None:
                log.warning("no finished SSL finetuning run in the sweep: the held-back case is not predicted")
            else:
                results["predict"] = predict_held_back(
                    child.out_dir, hippo / "imagesTr" / f"{HELD_BACK_CASE}.nii.gz",
                    hippo / "labelsTr" / f"{HELD_BACK_CASE}.nii.gz", out / "predict", console=console,
                    title=f"6. predict on the held-back case ({child.key}, test Dice "
                          f"{_dice_mean(child):.3f})")
    console.print("Open the runs: [bold]mlflow ui --backend-store-uri sqlite:///mlruns.db[/]")
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.1f} s[/] — outputs in {out.resolve()}")
    return results


def _pretrain(out: Path, datalist: Path, splits: Path, steps: int, tracking_uri: str | None,
              console: Console):
    """A short SimCLR pretraining of a small SegResNet encoder on the unlabeled pool (CPU-sized)."""
    from medssl.config import PretrainConfig
    from medssl.engines.pretrain.engine import run_pretraining

    cfg = PretrainConfig(datalist=str(datalist), splits=str(splits), method="simclr", encoder="segresnet",
                         encoder_kwargs={"init_filters": 8}, roi_size=[32, 32, 32], batch_size=4,
                         # no flips: anterior vs posterior hippocampus (classes 1/2) is a left/right-free but
                         # front/back distinction that flip-invariant features erase (demo measured dice_1 = 0)
                         augment_kwargs={"flip_prob": 0.0},
                         total_steps=steps, warmup_steps=max(1, steps // 10), lr=1e-3,
                         checkpoint_every=max(1, steps // 2), out_dir=str(out / "pretrain_simclr"), device="cpu",
                         experiment="medssl-demo", run_name="demo-simclr-segresnet", tracking_uri=tracking_uri)
    with console.status(f"3. SSL pretraining (SimCLR, SegResNet encoder, {steps} steps on CPU) …"):
        result = run_pretraining(cfg, progress=False)
    hist = result.loss_history
    table = Table(title="3. pretrain (SimCLR on the unlabeled pool)")
    for col in ("steps", "first loss", "last loss", "encoder", "MLflow run"):
        table.add_column(col, overflow="fold")
    table.add_row(str(len(hist)), f"{hist[0][1]:.3f}" if hist else "-", f"{hist[-1][1]:.3f}" if hist else "-",
                  str(result.encoder_path), str(result.run_id))
    console.print(table)
    return result


def _sweep(out: Path, datalist: Path, splits: Path, encoder: Path, steps: int, tracking_uri: str | None,
           console: Console):
    """A tiny label-efficiency study reusing the demo encoder, then its comparison."""
    from medssl.engines.studies.sweep import run_sweep
    from medssl.tracking.compare import compare_study

    study = "demo-hippocampus"
    pipeline = {
        "study": study, "experiment": "medssl-demo", "tracking_uri": tracking_uri, "out_dir": str(out / "sweeps"),
        "metric": "test_dice_mean",
        "data": {"datalist": str(datalist), "splits": str(splits)},
        "fractions": [25, 100], "inits": ["scratch", "ssl"], "seeds": [0],
        "pretrain": {"checkpoint": str(encoder)},
        "finetune": {"task": "segmentation", "network": "SegResNet", "network_kwargs": {"init_filters": 8},
                     "out_channels": 3, "roi_size": [32, 32, 32], "normalisation": "robust", "batch_size": 2,
                     "num_samples": 2, "lr": 1e-3, "max_steps": steps, "warmup_steps": max(1, steps // 10),
                     "sw_batch_size": 4, "device": "cpu", "augment": DEMO_FINETUNE_AUGMENT},
        # validate about every 50 steps (batch 2: 4 and 14 steps per epoch at 25 % and 100 %)
        "finetune_by_fraction": {25: {"val_every": 12}, 100: {"val_every": 4}},
    }
    with console.status(f"4. label-efficiency sweep: 2 fractions x {{scratch, ssl}}, {steps} steps each …"):
        sweep = run_sweep(pipeline, new=True)
    console.print(sweep.table("test_dice_mean"))
    comparison = compare_study(study, tracking_uri=tracking_uri, parent_run_id=sweep.parent_run_id)
    console.print(comparison.table)
    if comparison.efficiency is not None:  # one seed: the tool's headline, not a result (no CI)
        console.print(f"[bold]Labels needed[/] (1 seed, demo-sized): {escape(comparison.efficiency.sentence())}",
                      soft_wrap=True)
    console.print(f"5. compare → {comparison.csv_path} and {comparison.png_path} (logged to the parent run)")
    return sweep, comparison


def stage_sample(hippo: Path, dst: Path, held_back: str) -> Path:
    """Copy the MSD-layout sample to ``dst`` without the ``held_back`` case (image, label, ``dataset.json``
    entries); returns ``dst``. Copies keep their times, so a re-run's ingest reuses its fingerprints.

    Raises:
        MedsslError: ``held_back`` is not a labelled case of the sample.
    """
    name = f"{held_back}.nii.gz"
    if not (hippo / "imagesTr" / name).is_file() or not (hippo / "labelsTr" / name).is_file():
        raise MedsslError(f"held-back demo case {held_back}: {hippo}/imagesTr and labelsTr must both hold {name}")
    shutil.copytree(hippo, dst, dirs_exist_ok=True, ignore=lambda _d, files: [f for f in files if f == name])
    for sub in ("imagesTr", "labelsTr"):  # a stale copy from an older demo layout
        (dst / sub / name).unlink(missing_ok=True)
    meta = json.loads((hippo / "dataset.json").read_text())
    meta["training"] = [t for t in meta["training"] if not t["image"].endswith(f"/{name}")]
    meta["numTraining"] = len(meta["training"])
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dst


def _dice_mean(child) -> float:
    return float(child.metrics.get("test_dice_mean", child.metrics.get("dice_mean", float("nan"))))


def _best_ssl_child(sweep):
    """The finished SSL-initialised child of the largest fraction with the best test Dice (``None``: none)."""
    done = [c for c in sweep.children if c.status in ("FINISHED", "SKIPPED") and c.init == "ssl"]
    if not done:
        return None
    top = max(c.fraction for c in done)
    return max((c for c in done if c.fraction == top), key=lambda c: float(np.nan_to_num(_dice_mean(c), nan=-1.0)))


def predict_held_back(model: str | Path, image: Path, label: Path, out: Path, *, console: Console | None = None,
                      title: str = "predict on the held-back case") -> dict:
    """``predict`` (the library function) on one volume, then a table: class, voxels predicted / in the label,
    Dice against the label, and the written path.

    Args:
        model: a finetune run folder / checkpoint / MLflow URI (:func:`medssl.deploy.model.load_model`).
        image: the NIfTI volume; label: its reference label map (same grid).
        out: predict's output folder (``<out>/<case>_seg.nii.gz``).

    Returns:
        ``{"seg": Path, "dice": {"dice_1", …, "dice_mean"}, "voxels_per_class": {name: n}, "result": PredictResult}``.

    Raises:
        MedsslError: the prediction failed.
    """
    from medssl.data.nifti import load_nifti
    from medssl.deploy.predict import predict
    from medssl.deploy.score import score_files

    console = console or Console()
    res = predict(model, [image], out)
    if res.exit_code or not res.ok:
        raise MedsslError(f"demo predict on {image} failed: {res.failed}")
    row = res.ok[0]
    seg = Path(row["outputs"]["seg"])
    counts = row["voxels_per_class"]
    dice = score_files(seg, label, len(counts))
    ref = np.bincount(np.rint(load_nifti(label).array).astype(np.int64).ravel(), minlength=len(counts))
    table = Table(title=title)
    for col in ("class", "voxels predicted", "voxels in label", "Dice"):
        table.add_column(col)
    for c, (name, n) in enumerate(counts.items()):
        table.add_row(f"{c} {name}", str(n), str(int(ref[c])), f"{dice[f'dice_{c}']:.3f}" if c else "-")
    table.add_row("mean (foreground)", "", "", f"{dice['dice_mean']:.3f}")
    console.print(table)
    console.print(f"written: {seg}", soft_wrap=True)
    return {"seg": seg, "dice": dice, "voxels_per_class": counts, "result": res}
