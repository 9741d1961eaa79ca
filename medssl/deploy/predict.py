"""`medssl predict`: a finetuned segmentation model on NIfTI files / DICOM series → label maps on the input's grid.

Per case (:mod:`medssl.deploy.predict_inputs` finds and reads them with the ingest readers)::

    read + validate  →  preprocess_transforms(recipe)  →  SlidingWindowInferer(roi, overlap, gaussian)
        [+ test-time flips along the recipe's flip_axes, softmax averaged]  →  Invertd (probabilities)
        →  argmax  →  <out>/<case>_seg.nii.gz  [+ _prob.nii.gz, _uncertainty.nii.gz, _seg.dcm]

Ensembles: several models (e.g. the seeds or folds of one study, or a scratch and an SSL-initialised run) are
loaded once each and their softmax maps averaged (each with its own sliding window and test-time flips) before
the argmax, as nnU-Net ensembles its folds; the members must preprocess alike (`ENSEMBLE_KEYS`).

The label map has exactly the input's shape and affine (DICOM: the series' geometry as the ingest reader
builds it). The model is loaded once; the next case is read and preprocessed in a background thread while
the current one is computed, and outputs are written in another (measured: module comment at `predict`).
A bad case is reported (file + reason) and skipped; ``predict_report.json`` lists every case.

Outputs per case:

- ``<case>_seg.nii.gz``: uint8 labels (uint16 above 255 classes), the input's affine (sform = qform, code 1).
- ``--probabilities``: ``<case>_prob.nii.gz`` float32 ``(X, Y, Z, K)`` softmax (sums to 1 per voxel) and
  ``<case>_uncertainty.nii.gz`` float32 normalised entropy ``-Σ p log p / log K`` in [0, 1] (0 = certain).
- ``--dicom-seg`` (DICOM inputs): ``<case>_seg.dcm``, a DICOM SEG (:mod:`medssl.deploy.dicom_seg`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.engines.finetune.tta import flip_dims
from medssl.errors import MedsslError

__all__ = ["BACKENDS", "ENSEMBLE_KEYS", "PredictResult", "case_progress", "tta_flips", "predict_probabilities",
           "predict"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torchscript", "onnx")
REPORT_NAME = "predict_report.json"
# What an ensemble's members must share: everything that makes the input tensor or names the output channels.
# Window size, overlap and test-time flips may differ (each member runs its own).
ENSEMBLE_KEYS = ("task", "in_channels", "out_channels", "class_names", "axcodes", "target_spacing", "normalisation",
                 "ct_window")


def tta_flips(flip_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Test-time flips: every non-empty combination of the allowed spatial axes (nnU-Net's mirroring), as
    tensor dims of a ``(B, C, X, Y, Z)`` batch (:func:`medssl.engines.finetune.tta.flip_dims`, the same flips finetuning
    scores with when ``tta`` is on).

    Only axes the training augmentation flipped are allowed (a flip the model never saw can swap classes,
    e.g. left/right structures). Example: ``[0]`` → ``[(2,)]``; ``[0, 2]`` → ``[(2,), (4,), (2, 4)]``.

    Raises:
        MedsslError: an axis outside 0..2.
    """
    try:
        return flip_dims(flip_axes)
    except ValueError as e:
        raise MedsslError(f"recipe {e}") from e


def predict_probabilities(x: torch.Tensor, runner: Callable[[torch.Tensor], torch.Tensor],
                          inferer: Callable[..., torch.Tensor], flips: Sequence[tuple[int, ...]] = ()) -> torch.Tensor:
    """Softmax of the sliding-window logits, averaged over the identity and each flip.

    Args:
        x: ``(1, C, X, Y, Z)`` preprocessed volume on the model's device.
        runner: ``(B, C, x, y, z)`` windows → ``(B, K, x, y, z)`` logits.
        inferer: ``inferer(inputs, runner)`` (MONAI ``SlidingWindowInferer``).
        flips: tensor dims to flip (`tta_flips`); each flip is undone on the output before averaging.

    Returns:
        ``(1, K, X, Y, Z)`` float32 probabilities (sum to 1 over K).
    """
    with torch.inference_mode():
        total = torch.softmax(inferer(x, runner).float(), dim=1)
        for dims in flips:
            total += torch.flip(torch.softmax(inferer(torch.flip(x, dims), runner).float(), dim=1), dims)
    return total / (1 + len(flips))


@dataclass
class PredictResult:
    """What `predict` did.

    Attributes:
        out_dir: the output folder; ``report_path``: its ``predict_report.json``.
        cases: one row per case or problem: ``{"input", "case", "status" (ok | failed | skipped), "reason",
            "detail", "outputs", "shape", "voxels_per_class", "infer_s", "write_s"}``.
        seconds: wall time of the whole call.
    """

    out_dir: Path
    report_path: Path
    cases: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Rows of failed inputs (exit code 1 when any)."""
        return [c for c in self.cases if c["status"] == "failed"]

    @property
    def ok(self) -> list[dict[str, Any]]:
        """Rows of written cases."""
        return [c for c in self.cases if c["status"] == "ok"]

    @property
    def exit_code(self) -> int:
        """0 when every input was written, else 1."""
        return 1 if self.failed else 0


@contextmanager
def case_progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar over cases on stderr, yielding ``advance(case_name)``; a no-op when disabled."""
    if not enabled:
        yield lambda name: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[case]}"),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("predict", total=total, case="")
        yield lambda name: bar.update(task, advance=1, case=name)


def _load_runner(model: Any, backend: str, device: torch.device, tracking_uri: str | None
                 ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any], str]:
    """``(runner, preprocessing recipe, source)`` for a backend; ``model`` may be a loaded `DeployModel` (torch)
    or `Exported` (torchscript / onnx)."""
    from medssl.deploy.model import DeployModel, load_model

    if backend not in BACKENDS:
        raise MedsslError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        m = model if isinstance(model, DeployModel) else load_model(model, device=device, tracking_uri=tracking_uri)
        return m.network.to(device), dict(m.preprocessing), m.source
    try:
        from medssl.deploy.export import Exported, load_exported
    except ImportError as e:
        raise MedsslError(f"backend {backend!r} needs medssl.deploy.export (TorchScript/ONNX export), which this "
                          "installation lacks; use --backend torch") from e
    if isinstance(model, Exported):  # loaded once by the caller (a service, benchmarks/predict.py)
        if model.format != backend:
            raise MedsslError(f"model {model.source} is loaded as {model.format}, not {backend}")
        return model.runner, dict(model.preprocessing), str(model.source)
    exported = load_exported(model, backend=backend, device=str(device))
    return exported.runner, dict(exported.preprocessing), str(exported.source)


@dataclass(frozen=True)
class _Member:
    """One loaded model of a (possibly one-model) ensemble with its own inferer and test-time flips."""

    runner: Callable[[torch.Tensor], torch.Tensor]
    prep: dict[str, Any]
    source: str
    inferer: Callable[..., torch.Tensor]
    flips: list[tuple[int, ...]]


def _load_members(models: Sequence[Any], backend: str, dev: torch.device, tracking_uri: str | None,
                  batch: int | None, tta: bool) -> list[_Member]:
    """Load every model once; check they are segmentation models that preprocess alike (`ENSEMBLE_KEYS`).

    Raises:
        MedsslError: a model that cannot be loaded or is not a segmentation model, or two members that differ in
            an `ENSEMBLE_KEYS` field (naming both sources, the field and both values).
    """
    from monai.inferers import SlidingWindowInferer

    members: list[_Member] = []
    for model in models:
        runner, prep, source = _load_runner(model, backend, dev, tracking_uri)
        if prep.get("task") != "segmentation":
            raise MedsslError(f"model {source}: predict needs a segmentation model, this one is {prep.get('task')!r}")
        if members:
            first = members[0]
            for key in ENSEMBLE_KEYS:
                if prep.get(key) != first.prep.get(key):
                    raise MedsslError(
                        f"ensemble: model {source} has {key}={prep.get(key)!r}, model {first.source} "
                        f"{first.prep.get(key)!r}; the members of an ensemble must preprocess alike and predict the "
                        f"same classes ({', '.join(ENSEMBLE_KEYS)})"
                    )
        inferer = SlidingWindowInferer(roi_size=list(prep["roi_size"]),
                                       sw_batch_size=int(batch or prep.get("sw_batch_size") or 4),
                                       overlap=float(prep.get("sw_overlap", 0.25)), mode="gaussian")
        flips = tta_flips(prep.get("flip_axes") or []) if tta else []
        if tta and not flips:
            log.warning("--tta: the training of %s flipped no axis, so no test-time flip is allowed; predicting "
                        "without", source)
        members.append(_Member(runner, prep, source, inferer, flips))
    return members


def _prepare(case: Any, chain: Any, in_channels: int) -> tuple[list[tuple[Any, dict[str, Any]]], float]:
    """Reader-thread work: read one case (ingest readers), preprocess each of its volumes; ``(volumes, s)``."""
    from monai.data import MetaTensor

    from medssl.deploy.predict_inputs import read_case

    t0, out = time.perf_counter(), []
    for loaded in read_case(case, in_channels=in_channels):
        img = MetaTensor(torch.from_numpy(loaded.array), affine=torch.as_tensor(loaded.affine, dtype=torch.float64))
        out.append((loaded, chain({"image": img})))
    return out, time.perf_counter() - t0


def _infer(d: dict[str, Any], loaded: Any, members: Sequence[_Member], inverter: Callable,
           dev: torch.device) -> np.ndarray:
    """Probabilities ``(K, X, Y, Z)`` float32 on the input's own grid (sliding window, flips, the members' mean,
    Invertd)."""
    x = d["image"].unsqueeze(0).to(dev)
    total = predict_probabilities(x, members[0].runner, members[0].inferer, members[0].flips)
    for m in members[1:]:
        total += predict_probabilities(x, m.runner, m.inferer, m.flips)
    d["pred"] = (total / len(members))[0].cpu()
    probs = inverter(d)["pred"]
    probs = np.asarray(probs.detach().cpu().numpy() if torch.is_tensor(probs) else probs, np.float32)
    if tuple(probs.shape[1:]) != loaded.shape:
        raise MedsslError(f"inverted prediction has shape {tuple(probs.shape[1:])}, the input {loaded.shape}")
    return probs


def _write(loaded: Any, probs: np.ndarray, out: Path, *, probabilities: bool, dicom_seg: bool,
           class_names: dict[str, str], algorithm: tuple[str, str]) -> dict[str, Any]:
    """Writer-thread work: label map (+ probabilities, uncertainty, DICOM SEG); returns the report fields."""
    from medssl.data.nifti import save_nifti

    t0, k = time.perf_counter(), probs.shape[0]
    labels = probs.argmax(0).astype(np.uint8 if k <= 256 else np.uint16)
    outputs = {"seg": str(save_nifti(labels, loaded.affine, out / f"{loaded.name}_seg.nii.gz"))}
    if probabilities:
        p = np.moveaxis(probs, 0, -1).astype(np.float32)  # (X, Y, Z, K)
        outputs["prob"] = str(save_nifti(p, loaded.affine, out / f"{loaded.name}_prob.nii.gz"))
        ent = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(-1) / max(math.log(k), 1e-12)
        outputs["uncertainty"] = str(save_nifti(ent.astype(np.float32), loaded.affine,
                                                out / f"{loaded.name}_uncertainty.nii.gz"))
    row: dict[str, Any] = {"outputs": outputs}
    if dicom_seg and loaded.source_files:
        from medssl.deploy.dicom_seg import write_dicom_seg

        res = write_dicom_seg(labels, loaded.affine, loaded.source_files, out / f"{loaded.name}_seg.dcm",
                              class_names=class_names, algorithm=algorithm)
        outputs["dicom_seg"] = str(res.path)
        row["dicom_seg"] = {"segments": res.segments, "empty_classes": res.empty_classes, "frames": res.n_frames}
    elif dicom_seg:
        row["note"] = "no DICOM SEG: the input is not a DICOM series"
    counts = np.bincount(labels.ravel(), minlength=k)
    row["voxels_per_class"] = {class_names.get(str(c), str(c)): int(n) for c, n in enumerate(counts)}
    row["write_s"] = round(time.perf_counter() - t0, 3)
    return row


def _problem_row(case: Any, e: Exception) -> dict[str, Any]:
    reason = getattr(e, "reason", None) or ("error" if isinstance(e, MedsslError) else type(e).__name__)
    detail = getattr(e, "detail", None) or (str(e) if isinstance(e, MedsslError) else f"{type(e).__name__}: {e}")
    return {"input": str(case.path), "case": case.name, "status": "failed", "reason": reason, "detail": detail}


def predict(model: Any, inputs: Sequence[str | Path], out: str | Path, *, backend: str = "torch",
            device: str = "cpu", batch: int | None = None, tta: bool = False, probabilities: bool = False,
            dicom_seg: bool = False, progress: bool = False, tracking_uri: str | None = None,
            prefetch: bool | None = None) -> PredictResult:
    """Segment every case under ``inputs`` with one model load; write outputs and ``predict_report.json``.

    Args:
        model: a finetune checkpoint / run folder / ``runs:/`` / ``models:/`` URI (torch backend; see
            :func:`medssl.deploy.model.load_model`), an exported file for ``torchscript`` / ``onnx``, or an
            already loaded :class:`~medssl.deploy.model.DeployModel` (torch) or
            :class:`~medssl.deploy.export.Exported` (its backend); a list or tuple of these is an ensemble
            (softmax averaged over the members; module docstring).
        inputs: NIfTI files, DICOM series folders, or folders of either (walked recursively).
        out: output folder (created).
        backend: ``torch`` | ``torchscript`` | ``onnx``.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        batch: windows per forward pass (``sw_batch_size``; default: the recipe's).
        tta: average the softmax over test-time flips along the recipe's ``flip_axes`` (`tta_flips`).
        probabilities: also write the softmax and normalised-entropy maps.
        dicom_seg: also write a DICOM SEG for DICOM inputs.
        progress: show a rich progress bar over cases (stderr).
        tracking_uri: MLflow store for ``runs:/`` / ``models:/`` sources.
        prefetch: read the next case and write outputs in background threads (``False``: all in sequence);
            ``None`` (default) = on for a CUDA device, off on the CPU, where the threads compete with torch's for
            the cores (measured on an idle 2-core machine: 0.125 s/volume with them vs 0.090 s in sequence).

    Returns:
        A `PredictResult`; ``exit_code`` is 1 when any input failed (the others are written).

    Raises:
        MedsslError: the model cannot be loaded or is not a segmentation model, ensemble members that do not
            preprocess alike, a bad option, or no input holds any case at all (nothing to report on).
    """
    from monai.transforms import Invertd

    import medssl
    from medssl.deploy.predict_inputs import discover_cases
    from medssl.transforms.preprocess import preprocess_transforms

    t0 = time.perf_counter()
    out = Path(out)
    dev = torch.device(device)
    if batch is not None and batch < 1:
        raise MedsslError(f"--batch must be >= 1, got {batch}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise MedsslError("no model given")
    members = _load_members(models, backend, dev, tracking_uri, batch, tta)
    prep, source, flips = members[0].prep, members[0].source, members[0].flips
    chain = preprocess_transforms(prep, load=False)
    inverter = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False, to_tensor=True, device="cpu")
    class_names = {str(k): str(v) for k, v in (prep.get("class_names") or {}).items()}
    cases, problems = discover_cases(inputs, exclude=out)
    if not cases and not problems:
        raise MedsslError(f"no input given (inputs: {list(map(str, inputs))})")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = list(problems)
    for p in problems:
        log.warning("%s %s: %s (%s)", p["status"], p["input"], p["reason"], p["detail"])
    in_ch = int(prep.get("in_channels") or 1)
    algorithm = ("medssl", str(getattr(medssl, "__version__", "0")))
    # Overlap I/O with compute: one thread reads + preprocesses case i+1 while case i runs, another writes
    # (gzip) outputs, so a folder costs about max(read, infer, write) per case instead of their sum; the
    # report's "stages" gives the three sums and the wall time. Threads suffice: gzip/zlib, numpy and torch
    # release the GIL in their heavy loops. benchmarks/predict.py measures it ("predict[torch] sequential" =
    # prefetch off) beside a hand-written MONAI loop: on the shared 2-core CPU with OMP_NUM_THREADS=1 and the
    # demo's SegResNet-8 (hippocampus, 8 windows of 32^3 per volume) sliding-window inference is ~90 % of a
    # volume's time, so the overlap saves only the I/O share (a few %); it pays where inference is fast (GPU).
    if prefetch is None:
        prefetch = dev.type == "cuda"
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medssl-read") if prefetch else None
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medssl-write") if prefetch else None
    pending: list[tuple[dict[str, Any], Future | dict[str, Any]]] = []
    stages = {"read_s": 0.0, "infer_s": 0.0, "write_s": 0.0}
    kw = dict(probabilities=probabilities, dicom_seg=dicom_seg, class_names=class_names, algorithm=algorithm)

    def submit(i: int) -> Future | None:
        return reader.submit(_prepare, cases[i], chain, in_ch) if reader and i < len(cases) else None

    try:
        with case_progress(progress, len(cases)) as advance:
            nxt = submit(0)
            for i, case in enumerate(cases):
                try:
                    prepared, read_s = nxt.result() if nxt is not None else _prepare(case, chain, in_ch)
                    stages["read_s"] += read_s
                except Exception as e:  # noqa: BLE001 - any reading failure skips this case only
                    prepared = e
                nxt = submit(i + 1)
                if isinstance(prepared, Exception):
                    rows.append(_problem_row(case, prepared))
                    log.warning("failed %s: %s", case.path, rows[-1]["detail"])
                    advance(case.name)
                    continue
                for loaded, d in prepared:
                    row = {"input": str(case.path), "case": loaded.name, "status": "ok", "shape": list(loaded.shape)}
                    t_inf = time.perf_counter()
                    try:
                        probs = _infer(d, loaded, members, inverter, dev)
                        row["infer_s"] = round(time.perf_counter() - t_inf, 3)
                        pending.append((row, writer.submit(_write, loaded, probs, out, **kw) if writer
                                        else _write(loaded, probs, out, **kw)))
                    except Exception as e:  # noqa: BLE001 - one bad volume must not stop the batch
                        row.update(_problem_row(case, e) | {"case": loaded.name})
                        log.warning("failed %s: %s", case.path, row["detail"])
                    stages["infer_s"] += time.perf_counter() - t_inf
                    rows.append(row)
                advance(case.name)
            for row, fut in pending:
                try:
                    row.update(fut.result() if isinstance(fut, Future) else fut)
                    stages["write_s"] += row["write_s"]
                except Exception as e:  # noqa: BLE001 - a failed write (e.g. DICOM SEG geometry) fails its case
                    row.update({"status": "failed", "reason": getattr(e, "reason", None) or "write_failed",
                                "detail": str(e) if isinstance(e, MedsslError) else f"{type(e).__name__}: {e}"})
                    log.warning("failed %s: %s", row["input"], e)
    finally:
        for pool in (reader, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    result = PredictResult(out_dir=out, report_path=out / REPORT_NAME, cases=rows,
                           seconds=round(time.perf_counter() - t0, 3))
    report = {"model": source if len(members) == 1 else [m.source for m in members], "backend": backend,
              "device": str(dev), "tta": any(m.flips for m in members),
              "tta_flips": [[d - 2 for d in f] for f in flips], "sw_batch_size": members[0].inferer.sw_batch_size,
              "sw_overlap": float(prep.get("sw_overlap", 0.25)), "roi_size": list(prep["roi_size"]),
              "preprocessing": prep, "ok": len(result.ok), "failed": len(result.failed),
              "skipped": sum(r["status"] == "skipped" for r in rows), "seconds": result.seconds,
              "prefetch": prefetch, "stages": {k: round(v, 3) for k, v in stages.items()}, "cases": rows}
    if len(members) > 1:  # top-level window and flip fields are the first member's; each member's here
        report["ensemble"] = [{"model": m.source, "roi_size": list(m.prep["roi_size"]),
                               "sw_overlap": float(m.prep.get("sw_overlap", 0.25)),
                               "tta_flips": [[d - 2 for d in f] for f in m.flips]} for m in members]
    result.report_path.write_text(json.dumps(report, indent=2, default=str))
    log.info("predict: %d written, %d failed → %s", len(result.ok), len(result.failed), result.report_path)
    return result
