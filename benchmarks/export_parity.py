"""Export parity against an fp64 reference: which backend, exporter, opset or ONNX Runtime option moves the logits.

Issue 10's export gate is max |logit diff| ≤ 1e-4 against the eager fp32 model and identical argmax on ≥ 99.99 %
of the voxels. This measures, on one trained model and the gate's own real inputs (:func:`check_input`: the
centre ROI of a real volume and two crops of another shape), every backend against the same model in **fp64**
(``copy.deepcopy(net).double()``), so that "ONNX differs from eager" can be split into "ONNX is wrong" vs "eager
fp32 is itself that far from exact":

- ``eager fp32`` and ``TorchScript`` (``torch.jit.script``);
- ONNX as torch exports the network unchanged — the dynamo exporter (``torch.export`` + ``torch.onnx.export(...,
  dynamo=True)``) at opsets 17, 18 (GroupNorm → ``InstanceNormalization``) and 21 (``GroupNormalization``), the
  legacy TorchScript-based exporter (``dynamo=False``) at 17 and 18 — each run by ONNX Runtime at graph
  optimisation levels DISABLE_ALL / BASIC / EXTENDED / ALL;
- ``medssl export``: the file :func:`medssl.deploy.export.export_network` writes (norm layers as
  :class:`~medssl.deploy.onnx_norm.CascadedGroupNorm`), the same four levels.

Columns: max |Δ| against fp64 and against eager fp32 (the gate's quantity), argmax agreement with eager, whether
the gate passes, and milliseconds per sliding-window batch (``sw_batch_size`` ROIs; median of 3, ONNX Runtime
with torch's thread count, as :func:`~medssl.deploy.export.load_exported`). Also the largest |logit| (the 1e-4
gate as a relative tolerance) and, with ``--layers`` (default on), every norm layer alone: its fp64-captured
input run in fp32 by torch, by ONNX Runtime as exported, and cascaded, each against the layer's fp64 output —
this localises the error.

Without ``--checkpoint`` it first finetunes the SegResNet-8 of ``benchmarks/predict.py`` (8 filters, 32³ ROI,
``--steps`` 200: about 3.5 minutes on 2 CPU cores) on the first 20 real hippocampus cases; the check volume is
then ``benchmarks/predict.py``'s (the 24th case from the end). The measurement itself takes about 1.5 minutes.
Prints a Markdown block (machine, versions, tables); ``--out DIR`` also writes ``export_parity.json`` / ``.md``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_parity.py --out benchmarks/out/export_parity
    .venv/bin/python benchmarks/export_parity.py --checkpoint runs/ft/checkpoints/best.pt --volume case.nii.gz
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msd_task04_hippocampus"
LEVELS = ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_EXTENDED", "ENABLE_ALL")

log = logging.getLogger("bench_export_parity")

__all__ = ["main", "measure", "markdown"]


def _onnx_bytes(net: Any, example: Any, exporter: str, opset: int) -> bytes:
    """``net`` exported by torch as it is: ``dynamo`` (torch.export, dynamic batch + spatial axes, as medssl
    captures it) or ``legacy`` (the TorchScript-based exporter, dynamic axes)."""
    import torch
    from torch.export import Dim

    if exporter == "dynamo":
        dims = {0: Dim("batch", max=1024), **{i: Dim.DYNAMIC for i in range(2, example.ndim)}}
        ep = torch.export.export(net, (example,), dynamic_shapes=(dims,), strict=False)
        return torch.onnx.export(ep, (example,), dynamo=True, opset_version=opset, verbose=False
                                 ).model_proto.SerializeToString()
    f = io.BytesIO()
    axes = {"image": {0: "b", **{i: f"s{i}" for i in range(2, example.ndim)}}}
    torch.onnx.export(net, (example,), f, dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=["logits"], dynamic_axes=axes)
    return f.getvalue()


def _session(model: bytes, level: str) -> Callable[[Any], Any]:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.detach().float().numpy()})[0])


def _norm_ops(model: bytes) -> str:
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
    return next((o for o in ("GroupNormalization", "InstanceNormalization") if o in ops), "ReduceMean (cascaded)")


def _ms(run: Callable[[Any], Any], x: Any) -> float:
    run(x)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def layer_table(net: Any, x: Any) -> list[dict[str, Any]]:
    """Every GroupNorm / InstanceNorm of ``net`` alone on its fp64-captured input ``x`` (module docstring)."""
    import torch

    from medssl.deploy.onnx_norm import cascade_norms

    ref = copy.deepcopy(net).double()
    caps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    kinds = (torch.nn.GroupNorm, torch.nn.InstanceNorm3d)
    for name, mod in ref.named_modules():
        if isinstance(mod, kinds):  # clone: SegResNet's in-place ReLU overwrites the output afterwards
            mod.register_forward_hook(lambda m, a, o, n=name: caps.__setitem__(n, (a[0].clone(), o.clone())))
    with torch.no_grad():
        ref(x.double())
    mods = dict(net.named_modules())
    rows = []
    for name, (x64, y64) in caps.items():
        mod, xin = mods[name], x64.float()
        groups = getattr(mod, "num_groups", getattr(mod, "num_features", 1))
        with torch.no_grad():
            err = {"torch": (mod(xin).double() - y64).abs().max()}
        for kind, m in (("ort", mod), ("ort_cascaded", cascade_norms(mod)[0])):
            err[kind] = (_session(_onnx_bytes(m, xin, "legacy", 18), "ENABLE_ALL")(xin).double() - y64).abs().max()
        rows.append({"layer": name, "group_voxels": int(x64[0].numel() // groups), "max_abs_out": float(y64.abs().max()),
                     **{k: float(v) for k, v in err.items()}})
    return rows


def measure(checkpoint: str, volume: str, opsets: Sequence[int] = (17, 18, 21), layers: bool = True) -> dict[str, Any]:
    """The tables of the module docstring for one finetuned model and one real volume (JSON-ready dict)."""
    import onnx
    import onnxruntime
    import torch

    from benchmarks._machine import cpu_model
    from medssl.deploy.export import MAX_ABS_DIFF, MIN_ARGMAX_AGREEMENT, check_input, export_network
    from medssl.deploy.model import load_model

    model = load_model(checkpoint, device="cpu")
    net = model.network.eval()
    inputs = check_input(model, volume)
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        exact = {k: ref(v.double()) for k, v in inputs.items()}
        eager = {k: net(v) for k, v in inputs.items()}
    roi = [int(r) for r in model.preprocessing["roi_size"]]
    batch = torch.rand(int(model.preprocessing.get("sw_batch_size") or 4), inputs["roi"].shape[1], *roi,
                       generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []

    def add(backend: str, exporter: str, opset: int | None, norm: str, level: str, run: Callable[[Any], Any]) -> None:
        with torch.no_grad():
            got = {k: run(v) for k, v in inputs.items()}
            vs64 = max(float((got[k].double() - exact[k]).abs().max()) for k in inputs)
            vs32 = max(float((got[k] - eager[k]).abs().max()) for k in inputs)
            agree = min(float((got[k].argmax(1) == eager[k].argmax(1)).float().mean()) for k in inputs)
            ms = _ms(run, batch)
        rows.append({"backend": backend, "exporter": exporter, "opset": opset, "norm_op": norm, "ort_level": level,
                     "vs_fp64": vs64, "vs_eager": vs32, "argmax_vs_eager": agree, "ms_per_batch": round(ms, 1),
                     "gate": bool(vs32 <= MAX_ABS_DIFF and agree >= MIN_ARGMAX_AGREEMENT)})
        log.info("%s %s %s %s: vs fp64 %.3g, vs eager %.3g", backend, exporter, opset, level, vs64, vs32)

    add("eager fp32", "-", None, type(next((m for m in net.modules() if "Norm" in type(m).__name__), net)).__name__,
        "-", net)
    ts = torch.jit.script(net)
    add("TorchScript", "script", None, "-", "-", ts)
    example = torch.cat([inputs["roi"], inputs["roi"].flip(-1)])
    builds = [("dynamo", o) for o in opsets] + [("legacy", o) for o in opsets if o < 21]
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="medssl_parity_") as tmp:
        warnings.simplefilter("ignore")
        graphs = {(f"ONNX (torch, {e})", e, o): _onnx_bytes(net, example, e, o) for e, o in builds}
        path = export_network(net, inputs["roi"], "onnx", Path(tmp) / "model.onnx", {"preprocessing": {}})
        graphs[("ONNX (medssl export)", "dynamo", 18)] = path.read_bytes()
        for (backend, exporter, opset), data in graphs.items():
            for level in LEVELS:
                add(backend, exporter, opset, _norm_ops(data), level, _session(data, level))
        layer_rows = layer_table(net, inputs["other_shape"]) if layers else []
    m = os.getloadavg()
    return {
        "checkpoint": str(checkpoint), "volume": str(volume), "network": type(net).__name__,
        "network_kwargs": model.recipe.get("build", {}).get("kwargs"),
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "max_abs_logit": {k: float(v.abs().max()) for k, v in exact.items()},
        "eager_vs_fp64": rows[0]["vs_fp64"], "thresholds": {"max_abs_diff": MAX_ABS_DIFF,
                                                            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_end": list(m)},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "batch": list(batch.shape), "rows": rows, "layers": layer_rows,
    }


def markdown(res: dict[str, Any]) -> str:
    """RESULTS.md block: header, the backend table, the largest-error norm layers."""
    big = max(res["max_abs_logit"].values())
    src = f"finetuned here for {res['trained_steps']} steps" if res.get("trained_steps") else f"`{res['checkpoint']}`"
    lines = [f"{res['network']} {json.dumps(res['network_kwargs'])}, {src}; check volume "
             f"`{Path(res['volume']).name}`, inputs {res['inputs']}; {res['machine']['cpu']}, "
             f"{res['machine']['cores']} cores, torch threads {res['machine']['torch_threads']}, load "
             f"{res['machine']['load_average_end'][0]:.1f}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
             + ".", "",
             f"Largest |logit| (fp64): {big:.3g} → the 1e-4 gate is a relative {1e-4 / big:.1e}; eager fp32 is "
             f"{res['eager_vs_fp64']:.2g} from fp64.", "",
             "| backend | exporter | opset | norm op in graph | ORT level | max \\|Δ\\| vs fp64 | max \\|Δ\\| vs eager "
             f"| argmax = eager | gate | ms / batch {res['batch']} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['exporter']} | {r['opset'] or '-'} | {r['norm_op']} | {r['ort_level']} | "
                     f"{r['vs_fp64']:.2g} | {r['vs_eager']:.2g} | {100 * r['argmax_vs_eager']:.4f} % | "
                     f"{'pass' if r['gate'] else 'FAIL'} | {r['ms_per_batch']} |")
    if res["layers"]:
        worst = sorted(res["layers"], key=lambda r: -r["ort"])[:8]
        lines += ["", f"Norm layers alone on their fp64 input (`other_shape`), the {len(worst)} worst for ONNX Runtime "
                  f"of {len(res['layers'])}: max |Δ| of the layer output vs fp64", "",
                  "| layer | voxels / group | max \\|out\\| | torch fp32 | ORT (as exported) | ORT cascaded |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['layer']} | {r['group_voxels']:,} | {r['max_abs_out']:.3g} | {r['torch']:.2g} | {r['ort']:.2g} "
                  f"| {r['ort_cascaded']:.2g} |" for r in worst]
    return "\n".join(lines)


def _train(data: Path, steps: int, tmp: Path) -> tuple[str, str]:
    from benchmarks.predict import finetune

    images = sorted(p for p in (data / "imagesTr").glob("*.nii.gz") if (data / "labelsTr" / p.name).is_file())
    if len(images) < 30:
        raise SystemExit(f"{data}: {len(images)} labelled volumes, need 30 (20 to finetune on, the check volume)")
    return str(finetune(data, images[:20], tmp / "ft", steps, quick=False)), str(images[-24])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="finetune checkpoint / run folder / MLflow URI (default: "
                    "finetune a SegResNet-8 here)")
    ap.add_argument("--volume", default=None, help="real NIfTI check volume (default: see the module docstring)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD folder with imagesTr/ + labelsTr/")
    ap.add_argument("--steps", type=int, default=200, help="finetuning steps when no --checkpoint")
    ap.add_argument("--opsets", default="17,18,21", help="ONNX opsets of the unchanged-network exports")
    ap.add_argument("--no-layers", dest="layers", action="store_false", help="skip the per-norm-layer table")
    ap.add_argument("--out", type=Path, default=None, help="also write export_parity.json / .md here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("medssl", "monai", "onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    opsets = [int(o) for o in args.opsets.split(",")]
    with tempfile.TemporaryDirectory(prefix="medssl_parity_ft_") as tmp:
        ckpt, vol = (args.checkpoint, args.volume) if args.checkpoint else _train(args.data, args.steps, Path(tmp))
        if vol is None:
            from medssl.deploy.export import _default_volume

            vol = _default_volume(ckpt, None)
        res = measure(ckpt, args.volume or vol, opsets, args.layers)
    res["trained_steps"] = None if args.checkpoint else args.steps
    res["command"] = " ".join(["benchmarks/export_parity.py", *(sys.argv[1:] if argv is None else argv)])
    md = markdown(res) + f"\n\nCommand: `{res['command']}`"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "export_parity.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "export_parity.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
