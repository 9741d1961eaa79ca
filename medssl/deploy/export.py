"""Export a finetuned model to TorchScript and ONNX, each checked numerically against the eager model.

Formats (files under ``out``):

- ``model.ts`` — TorchScript by ``torch.jit.script`` (control flow and every spatial size kept; works for
  MONAI SegResNet, UNet, BasicUNet and the ResNet classifiers); ``method="trace"`` traces instead. The recipe
  is embedded as the extra file ``recipe.json`` (``torch.jit.load(..., _extra_files=...)``).
- ``model.onnx`` — ``torch.export.export`` (non-strict) with dynamic batch and spatial axes, translated by
  ``torch.onnx.export`` (the dynamo exporter) at ``opset`` (default 18); the recipe is the metadata property
  ``medssl.recipe``; input ``image`` ``(B, C, D, H, W)`` float32, output ``logits``. Group/InstanceNorm go in
  as :class:`~medssl.deploy.onnx_norm.CascadedGroupNorm` (ONNX Runtime's ``InstanceNormalization`` is not fp32
  accurate: :mod:`medssl.deploy.onnx_norm`); the check and ``medssl predict`` run it alike (:func:`load_exported`).
- ``recipe.json`` — the embedded recipe: ``{"preprocessing", "class_names", "versions", "network", "source",
  "formats"}`` (``preprocessing`` as :func:`medssl.deploy.model.preprocessing_recipe`).
- ``export_check.json`` — per format: ``max_abs_diff``, ``argmax_agreement``, ``passed`` (ONNX: ``opset`` and
  ``cascaded_norms``, the replaced layers per class, e.g. ``{"GroupNorm": 25}``) and the inputs
  checked (one ROI of a real volume preprocessed with the recipe, and for segmentation two crops of another
  shape in one batch, which proves the dynamic batch and spatial axes; :func:`check_input`).

A format passes with max |logit difference| ≤ 1e-4 (fp32) and identical argmax on ≥ 99.99 % of the voxels
(cases, classification). An exporter failure raises :class:`~medssl.errors.MedsslError` naming the module
(and operator, when the exporter names one) that blocked it.

Inference on an export (used by ``medssl predict``)::

    run, prep = load_exported("out/model.onnx")      # or "out/model.ts"; device="cuda" optional
    logits = run(x)          # x: torch.Tensor (B, C, D, H, W) float32 → torch.Tensor (B, K, D, H, W)
    # prep: the preprocessing dict, the argument of medssl.transforms.preprocess.preprocess_transforms
    exp = load_exported("out", backend="onnx")       # the folder + a backend; exp.runner, exp.preprocessing,
                                                     # exp.source (the file), exp.format
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medssl.deploy.model import DeployModel, load_model
from medssl.deploy.onnx_norm import cascade_norms, count_norms
from medssl.errors import MedsslError

__all__ = ["FORMATS", "MAX_ABS_DIFF", "MIN_ARGMAX_AGREEMENT", "ExportResult", "Exported", "export_model", "export_network",
           "load_exported", "check_input"]

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
MAX_ABS_DIFF = 1e-4
MIN_ARGMAX_AGREEMENT = 0.9999
_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
_OP = re.compile(r"\b(?:aten|prim|onnx)(?:::|\.)[A-Za-z_][A-Za-z0-9_.]*")


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``files`` (format → path), ``checks`` (format → check dict), the
    ``recipe.json`` and ``export_check.json`` paths."""

    files: dict[str, Path] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe_path: Path | None = None
    check_path: Path | None = None


def _versions() -> dict[str, str]:
    from medssl.engines.runtime.checkpoint import library_versions

    out = library_versions()
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = str(__import__(name).__version__)
        except ImportError:
            pass
    return out


def _blame(net: torch.nn.Module, exc: BaseException) -> str:
    """``module <name> (<Class>)`` of the deepest submodule of ``net`` whose ``forward`` is on the failing
    stack (or that TorchScript names as being compiled), plus ``operator <op>`` when the error names one."""
    names = {id(m): (n or "<root>", type(m).__name__) for n, m in net.named_modules()}
    found: tuple[str, str] | None = None
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        for frame, _ in traceback.walk_tb(err.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, torch.nn.Module) and id(obj) in names and frame.f_code.co_name == "forward":
                if found is None or names[id(obj)][0].count(".") >= found[0].count(".") or found[0] == "<root>":
                    found = names[id(obj)]
    text = "\n".join(str(err) for err in chain)
    if found is None or found[0] == "<root>":  # TorchScript: no Python frames; its message names source / class
        found = _blame_source(net, text) or found
    if found is None or found[0] == "<root>":
        m = re.search(r"__torch__\.(?:[\w.]*\.)?(\w+)\b", text) or re.search(r"'(\w+)\.forward' is being compiled", text)
        by_class = [v for v in names.values() if m and v[1] == m.group(1)]
        found = by_class[-1] if by_class else found
    parts = [f"module {found[0]} ({found[1]})"] if found else []
    op = _OP.search(text)
    if op:
        parts.append(f"operator {op.group(0)}")
    return ", ".join(parts) or "an unnamed part of the model"


def _blame_source(net: torch.nn.Module, text: str) -> tuple[str, str] | None:
    """The deepest submodule whose ``forward`` source holds a ``File "…", line N`` the error quotes."""
    import inspect

    spots = [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', text)]
    best: tuple[str, str] | None = None
    for name, mod in net.named_modules():
        try:
            lines, start = inspect.getsourcelines(type(mod).forward)
            src = inspect.getsourcefile(type(mod).forward)
        except (OSError, TypeError):
            continue
        if any(f == src and start <= n < start + len(lines) for f, n in spots):
            if best is None or name.count(".") >= best[0].count("."):
                best = (name or "<root>", type(mod).__name__)
    return best


def _fail(fmt: str, net: torch.nn.Module, exc: BaseException) -> MedsslError:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return MedsslError(f"cannot export {type(net).__name__} to {fmt}: blocked by {_blame(net, exc)}: "
                       f"{type(exc).__name__}: {first[:300]}")


def export_network(net: torch.nn.Module, example: torch.Tensor, fmt: str, path: Path, recipe: dict[str, Any], *,
                   opset: int = 18, method: str = "script") -> Path:
    """Write ``net`` (eval mode, CPU) as ``fmt`` to ``path`` with ``recipe`` embedded.

    Args:
        net: the network; ``example``: a ``(B, C, D, H, W)`` input (tracing / ONNX capture).
        fmt: ``"torchscript"`` or ``"onnx"``; ``opset``: ONNX opset; ``method``: TorchScript ``"script"`` or
            ``"trace"``.

    Raises:
        MedsslError: the exporter failed, naming the module / operator that blocked it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(recipe, indent=1, default=str)
    if fmt == "torchscript":
        try:
            ts = torch.jit.script(net) if method == "script" else torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(ts, str(path), _extra_files={"recipe.json": text})
        except Exception as e:  # noqa: BLE001 - every TorchScript frontend error means "not exportable"
            raise _fail(f"TorchScript ({method})", net, e) from e
        return path
    if fmt != "onnx":
        raise MedsslError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    import onnx
    from torch.export import Dim

    net, _ = cascade_norms(net)  # ORT's InstanceNormalization: 2e-4 off on a trained SegResNet (onnx_norm)
    dims = {0: Dim("batch", max=1024), **{i: Dim.DYNAMIC for i in range(2, example.ndim)}}
    try:
        # captured here (not by torch.onnx's fallback strategies, which may bake data-dependent code into
        # constants) so that untraceable code fails with its module on the stack
        if example.shape[0] == 1:  # a batch of 1 would be specialised to a constant
            example = torch.cat([example, example.flip(-1)])
        ep = torch.export.export(net, (example,), dynamic_shapes=(dims,), strict=False)
        prog = torch.onnx.export(ep, (example,), dynamo=True, opset_version=int(opset), input_names=["image"],
                                 output_names=["logits"], external_data=False, verbose=False)
        model = prog.model_proto
    except Exception as e:  # noqa: BLE001 - torch.export / onnx translation errors of any kind
        raise _fail(f"ONNX (opset {opset})", net, e) from e
    entry = model.metadata_props.add()
    entry.key, entry.value = "medssl.recipe", text
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Exported:
    """An exported model ready to run: ``runner`` ``(B, C, D, H, W)`` → logits, the ``preprocessing`` recipe,
    the file (``source``) and its ``format``; unpacks as ``runner, preprocessing = load_exported(...)``."""

    runner: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: dict[str, Any]
    source: str
    format: str

    def __iter__(self) -> Iterator[Any]:
        yield self.runner
        yield self.preprocessing


def _exported_file(path: Path, backend: str | None) -> tuple[Path, str]:
    if backend is not None and backend not in FORMATS:
        raise MedsslError(f"exported model backend must be one of {FORMATS}, got {backend!r}")
    if path.is_dir():
        if backend is None:
            found = [f for f in FORMATS if (path / _FILES[f]).is_file()]
            if len(found) != 1:
                raise MedsslError(f"{path}: name the backend (torchscript | onnx); export files found: {found}")
            backend = found[0]
        path = path / _FILES[backend]
    fmt = "onnx" if path.suffix == ".onnx" else "torchscript"
    if backend is not None and backend != fmt:
        raise MedsslError(f"exported model {path} is {fmt}, not {backend} (model.ts = torchscript, model.onnx = onnx)")
    if not path.is_file():
        raise MedsslError(f"exported model {path} not found (medssl export writes model.ts / model.onnx)")
    return path, fmt


def load_exported(path: str | Path, *, backend: str | None = None, device: str | torch.device = "cpu") -> Exported:
    """An exported model as a callable and its preprocessing recipe (see the module docstring).

    Args:
        path: ``model.ts`` (TorchScript), ``model.onnx`` (ONNX Runtime; CUDA provider on a CUDA ``device``), or
            the export folder (then ``backend`` picks the file when both are there).
        backend: ``"torchscript"`` / ``"onnx"`` (checked against the file), or ``None``.
        device: where the model runs; the callable returns its logits on the input's device.

    Returns:
        :class:`Exported` (unpacks to ``(runner, preprocessing)``).

    Raises:
        MedsslError: a missing / unreadable file, a backend that does not match it, or no embedded recipe.
    """
    path, fmt = _exported_file(Path(path), backend)
    dev = torch.device(device)
    if fmt == "onnx":
        try:
            import onnxruntime as ort

            providers = (["CUDAExecutionProvider"] if dev.type == "cuda" else []) + ["CPUExecutionProvider"]
            # ORT ignores OMP_NUM_THREADS and takes every core by default; use torch's count like the other
            # backends (benchmarks/predict.py: 2 ORT threads on a busy 2-core machine ran 1.5-2x slower than 1)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(str(path), opts, providers=providers)
            meta = sess.get_modelmeta().custom_metadata_map
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MedsslError(f"cannot load ONNX model {path}: {e}") from e
        if "medssl.recipe" not in meta:
            raise MedsslError(f"{path} has no embedded medssl recipe (metadata 'medssl.recipe')")
        name = sess.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            out = sess.run(None, {name: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(out).to(x.device)

        return Exported(run, json.loads(meta["medssl.recipe"])["preprocessing"], str(path), fmt)
    extra = {"recipe.json": ""}
    try:
        ts = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any TorchScript load error means an unusable file
        raise MedsslError(f"cannot load TorchScript model {path}: {e}") from e
    if not extra["recipe.json"]:
        raise MedsslError(f"{path} has no embedded medssl recipe (extra file recipe.json)")
    ts.eval()

    def run_ts(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ts(x.to(dev)).to(x.device)

    return Exported(run_ts, json.loads(extra["recipe.json"])["preprocessing"], str(path), fmt)


def _divisor(roi: Sequence[int]) -> int:
    """The largest power of two dividing every ROI side (a size the network surely accepts), e.g. 16 for 16³."""
    k = 1
    while all(int(r) % (2 * k) == 0 for r in roi) and k < 64:
        k *= 2
    return k


def _default_volume(source: str, tracking_uri: str | None) -> str:
    """The first single-file image (test, else validation, else training) of the datalist the model was
    finetuned on: the check needs a real volume."""
    import tempfile

    from medssl.deploy.model import load_finetune_checkpoint, resolve_source

    with tempfile.TemporaryDirectory(prefix="medssl_export_") as tmp:
        config = load_finetune_checkpoint(resolve_source(source, tmp, tracking_uri=tracking_uri)).get("config") or {}
    datalist = Path(str(config.get("datalist", "")))
    try:
        data = json.loads(datalist.read_text())
    except (OSError, ValueError):
        data = {}
    for section in ("test", "validation", "training"):
        for it in data.get(section) or []:
            image = it.get("image") if isinstance(it, dict) else None
            if isinstance(image, str):
                path = Path(image) if Path(image).is_absolute() else datalist.parent / image
                if path.is_file():
                    return str(path)
    raise MedsslError(f"no real volume to check the export of {source} on (its datalist {datalist} is not "
                      "readable here): pass --volume (a NIfTI file)")


def check_input(model: DeployModel, volume: str | Path) -> dict[str, torch.Tensor]:
    """The real inputs of the parity check: ``{"roi": (1, C, *roi_size)}`` (centre ROI of the volume
    preprocessed with the recipe: what the sliding window feeds the network) and, for segmentation,
    ``{"other_shape": (2, C, roi_0 + k, roi_1, roi_2)}`` (two crops of the same volume, one
    :func:`_divisor` ``k`` longer on the first axis: dynamic batch and spatial axes on real data).

    The second shape stays close to the ROI: deployment only ever runs ROIs (sliding window). (Its 2e-4 on a
    16× larger whole volume was ONNX Runtime's long fp32 norm sums, now cascaded: :mod:`medssl.deploy.onnx_norm`.)
    """
    from monai.transforms import ResizeWithPadOrCrop, SpatialCrop, SpatialPad

    from medssl.transforms.preprocess import preprocess_transforms

    prep = model.preprocessing
    try:
        x = preprocess_transforms(prep)({"image": str(volume)})["image"]
    except Exception as e:  # noqa: BLE001 - reader errors of any kind: name the file
        raise MedsslError(f"cannot read check volume {volume}: {e}") from e
    x = torch.as_tensor(x).float()
    roi = [int(r) for r in prep["roi_size"]]
    out = {"roi": torch.as_tensor(ResizeWithPadOrCrop(roi)(x))[None]}
    if prep["task"] == "segmentation":
        other = [roi[0] + _divisor(roi), roi[1], roi[2]]
        x = torch.as_tensor(SpatialPad(other)(x))
        crops = [SpatialCrop(roi_start=start, roi_end=[a + b for a, b in zip(start, other, strict=True)])(x)
                 for start in ([0, 0, 0], [int(s) - o for s, o in zip(x.shape[1:], other, strict=True)])]
        out["other_shape"] = torch.stack([torch.as_tensor(c) for c in crops])
    return out


def _compare(eager: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    diff = float((eager - got).abs().max()) if eager.shape == got.shape else float("inf")
    agree = float((eager.argmax(1) == got.argmax(1)).float().mean()) if eager.shape == got.shape else 0.0
    return {"shape": list(eager.shape), "max_abs_diff": diff, "argmax_agreement": agree}


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    opset: int = 18,
    volume: str | Path | None = None,
    method: str = "script",
    tracking_uri: str | None = None,
) -> ExportResult:
    """Export a finetuned model (:func:`~medssl.deploy.model.load_model` sources) and check each format.

    Args:
        source: checkpoint file, run folder, ``runs:/`` or ``models:/`` URI.
        out: output folder (files: module docstring).
        formats: any of ``"torchscript"``, ``"onnx"``.
        opset: ONNX opset.
        volume: the real NIfTI volume of the check; default: the first image of the training datalist.
        method: TorchScript ``"script"`` (default) or ``"trace"``.
        tracking_uri: MLflow store for URIs.

    Returns:
        :class:`ExportResult` (``export_check.json`` is written in every case).

    Raises:
        MedsslError: an unknown format, an exporter failure (module / operator named), or a format failing the
            numerical check (its numbers named; ``export_check.json`` holds all of them).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise MedsslError(f"unknown export format(s) {bad or formats} (formats: {', '.join(FORMATS)})")
    out = Path(out)
    model = load_model(source, device="cpu", tracking_uri=tracking_uri)
    net = model.network
    volume = str(volume) if volume is not None else _default_volume(str(source), tracking_uri)
    inputs = check_input(model, volume)
    recipe = {"preprocessing": model.preprocessing, "class_names": model.preprocessing["class_names"],
              "versions": _versions(), "network": model.recipe["build"]["kind"], "source": model.source,
              "formats": {"torchscript": {"method": method}, "onnx": {"opset": int(opset)}}}
    out.mkdir(parents=True, exist_ok=True)
    res = ExportResult(recipe_path=out / "recipe.json", check_path=out / "export_check.json")
    res.recipe_path.write_text(json.dumps(recipe, indent=1, default=str))
    with torch.no_grad():
        eager = {k: net(v) for k, v in inputs.items()}
    try:
        for fmt in formats:
            path = export_network(net, inputs["roi"], fmt, out / _FILES[fmt], recipe, opset=opset, method=method)
            run, _ = load_exported(path)
            checks = {k: _compare(eager[k], run(v)) for k, v in inputs.items()}
            worst = max(c["max_abs_diff"] for c in checks.values())
            agree = min(c["argmax_agreement"] for c in checks.values())
            res.files[fmt] = path
            res.checks[fmt] = {"file": path.name, "inputs": checks, "max_abs_diff": worst, "argmax_agreement": agree,
                               "passed": bool(worst <= MAX_ABS_DIFF and agree >= MIN_ARGMAX_AGREEMENT)}
            if fmt == "onnx":
                res.checks[fmt]["opset"] = int(opset)
                res.checks[fmt]["cascaded_norms"] = count_norms(net)
            else:
                res.checks[fmt]["method"] = method
    finally:
        res.check_path.write_text(json.dumps({"thresholds": {"max_abs_diff": MAX_ABS_DIFF, "min_argmax_agreement":
                                  MIN_ARGMAX_AGREEMENT}, "volume": volume,
                                  "checks": res.checks}, indent=1))
    failed = {f: c for f, c in res.checks.items() if not c["passed"]}
    if failed:
        raise MedsslError("export check failed for " + "; ".join(
            f"{f}: max |diff| {c['max_abs_diff']:.3g} (<= {MAX_ABS_DIFF:g}), argmax agreement "
            f"{c['argmax_agreement']:.6f} (>= {MIN_ARGMAX_AGREEMENT})" for f, c in failed.items())
            + f"; see {res.check_path}")
    log.info("exported %s to %s (%s)", model.source, out, ", ".join(f"{f}: {p.name}" for f, p in res.files.items()))
    return res

