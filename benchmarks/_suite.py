"""Shared pieces of the GPU suite (``benchmarks/gpu_suite.sh``): machine facts, part outputs, the summary.

Every part writes ``<part>.json`` (its numbers plus ``machine``, ``dry_run`` and ``wall_s``) and
``<part>.md`` (a Markdown fragment for ``benchmarks/RESULTS.md``) into the suite's output folder. Run as a
script it serves the shell driver (torch is imported only where needed, so a broken install still yields
the failure records)::

    python benchmarks/_suite.py env                                   # machine facts (JSON line)
    python benchmarks/_suite.py fallback --out O --part P --rc 124 --wall 90 --cap 90 --log L
    python benchmarks/_suite.py summary --out O --record O/work/parts.tsv [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

if TYPE_CHECKING:
    import torch

__all__ = ["machine", "sync_for", "md_table", "write_part", "hippocampus_images", "Timer", "PARTS"]

log = logging.getLogger(__name__)


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Facts printed beside every number: GPU name, torch / CUDA / cuDNN / MONAI versions, CPU, cores."""
    import monai
    import torch

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available() else None
    return {
        "device": str(dev),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def sync_for(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on CUDA (timings must wait for the kernels), else a no-op."""
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with 3 significant decimals, ``None`` as an en dash."""

    def cell(x: Any) -> str:
        if x is None:
            return "–"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_part(out_dir: Path, part: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<part>.json`` and ``<part>.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{part}.json", out_dir / f"{part}.md"
    js.write_text(json.dumps({"part": part, **payload}, indent=1, default=str) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    log.info("wrote %s and %s", js, md)
    return js, md


def hippocampus_images(data: Path, n: int) -> list[Path]:
    """The first ``n`` images of an MSD hippocampus folder (``<data>/imagesTr/*.nii.gz``).

    Raises:
        SystemExit: no image there (the message names the folder).
    """
    files = sorted((data / "imagesTr").glob("*.nii*"))[:n]
    if not files:
        raise SystemExit(f"no NIfTI volumes under {data / 'imagesTr'} (set MEDSSL_DATASETS)")
    return files


class Timer:
    """``with Timer() as t: ...`` then ``t.s``: wall seconds of the block."""

    def __enter__(self) -> Timer:
        self.t0, self.s = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


#: part name → what it measures (the order of the suite)
PARTS = {
    "augment_gpu": "batched SSL augmentation on the GPU vs the MONAI tutorial chain on the CPU and vs the model step",
    "pretrain_gpu": "pretraining steps/s of the engine, bf16 vs fp32",
    "study_gpu": "one seed of the hippocampus label-efficiency study at a GPU budget",
}


def _tail(path: Path | None, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


def _fallback(args: argparse.Namespace) -> int:
    """A part that wrote no JSON (crashed, timed out, could not import): write its failure record."""
    if (args.out / f"{args.part}.json").is_file():
        return 0
    timed_out = args.rc in (124, 137)
    status = f"timed out after {args.cap:g} s" if timed_out else f"failed (exit code {args.rc})"
    tail = _tail(args.log)
    payload = {"dry_run": args.dry_run, "status": status, "rc": args.rc, "timed_out": timed_out,
               "wall_s": args.wall, "cap_s": args.cap, "log_tail": tail}
    md = (f"### {PARTS.get(args.part, args.part)} — {status}" + (" (DRY RUN)" if args.dry_run else "")
          + f"\n\nNo result; last lines of its log:\n\n```\n{tail}\n```")
    write_part(args.out, args.part, payload, md)
    return 0


def _summary(args: argparse.Namespace) -> int:
    """``suite.json`` (every part's exit code, wall time, cap and status) and ``suite.md`` (a header with
    the machine and the per-part table, then every part's Markdown fragment)."""
    parts = []
    for line in args.record.read_text().splitlines():
        name, rc, wall, cap = line.split("\t")[:4]
        js = args.out / f"{name}.json"
        data = json.loads(js.read_text()) if js.is_file() else {}
        parts.append({"part": name, "rc": int(rc), "wall_s": float(wall), "cap_s": float(cap),
                      "timed_out": int(rc) in (124, 137), "json": js.name, "md": f"{name}.md",
                      "status": data.get("status", "ok" if int(rc) == 0 else f"exit code {rc}")})
    env = json.loads(args.env.read_text()) if args.env and args.env.is_file() else {}
    total = sum(p["wall_s"] for p in parts)
    (args.out / "suite.json").write_text(json.dumps(
        {"dry_run": args.dry_run, "machine": env, "parts": parts, "total_wall_s": total}, indent=1) + "\n")
    head = [
        "## GPU suite (issue 12, `benchmarks/gpu_suite.sh`" + (", DRY RUN on the CPU)" if args.dry_run else ")"),
        "",
        f"Machine: {env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}, MONAI {env.get('monai')}, Python {env.get('python')}, "
        f"{env.get('nproc')} CPUs ({env.get('cpu')}). Total wall time {total:.0f} s.",
        "",
        md_table(["part", "what", "exit code", "wall s", "cap s", "status"],
                 [[p["part"], PARTS.get(p["part"], ""), p["rc"], p["wall_s"], p["cap_s"], p["status"]]
                  for p in parts]),
    ]
    frags = [(args.out / p["md"]).read_text() for p in parts if (args.out / p["md"]).is_file()]
    (args.out / "suite.md").write_text("\n".join(head) + "\n\n" + "\n\n".join(f.rstrip() for f in frags) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="helpers of benchmarks/gpu_suite.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="machine facts as one JSON line")
    f = sub.add_parser("fallback", help="failure record of a part that wrote no JSON")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--part", required=True)
    f.add_argument("--rc", type=int, required=True)
    f.add_argument("--wall", type=float, required=True)
    f.add_argument("--cap", type=float, required=True)
    f.add_argument("--log", type=Path, default=None)
    f.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("summary", help="suite.json + suite.md")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--record", type=Path, required=True, help="TSV: part, rc, wall s, cap s")
    s.add_argument("--env", type=Path, default=None, help="the env command's JSON")
    s.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "env":
        import torch

        sys.stdout.write(json.dumps(machine("cuda" if torch.cuda.is_available() else "cpu")) + "\n")
        return 0
    return _fallback(args) if args.cmd == "fallback" else _summary(args)


if __name__ == "__main__":
    sys.exit(main())
