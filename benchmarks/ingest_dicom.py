"""DICOM series → NIfTI: medssl (`medssl.data.dicom`) vs the `dicom2nifti` package, side by side in one run.

Series: (1) TotalSegmentator example CT, 20 slices 512x512, JPEG 2000 lossless; (2) a synthetic uncompressed
CT, 60 slices 512x512 (Explicit VR LE, written by tests/data/dicom_factory.py into a temp folder).
Each conversion = scan + decode + write ``.nii.gz`` (both tools write through nibabel). Runs alternate between
the two tools; the median of ``--repeats`` runs is reported. Geometry check: the two NIfTIs must describe
the same voxel grid (``inv(A_theirs) @ A_ours`` a signed permutation with integer shifts, within 1e-3 mm) and
equal values after that mapping.

Usage: python benchmarks/ingest_dicom.py [--datasets ../shared/datasets] [--repeats 5] [--workers 4]
Prints a markdown table (append it to benchmarks/RESULTS.md with the machine line it prints).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _machine import cpu_model  # benchmarks/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parents[1]


def _synthetic(folder: Path, n: int = 60, naming: str = "ordered") -> Path:
    sys.path.insert(0, str(REPO))
    from tests.data.dicom_factory import stack_positions, write_series

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:n, 0:512, 0:512]
    body = ((y - 256) ** 2 + (x - 256) ** 2) < 200**2
    values = np.where(body, 40 + 0.2 * z + rng.normal(0, 15, body.shape), -1000).astype(np.float32).round()
    pos = stack_positions((-250.0, -250.0, -100.0), (1, 0, 0, 0, 1, 0), n, 1.25)
    write_series(folder, values, positions=pos, pixel_spacing=(0.9765625, 0.9765625), naming=naming)
    return folder


def _ours(src: Path, out: Path, workers: int, decode: str = "auto") -> Path:
    from medssl.data.dicom import load_series, save_nifti, scan_dicom

    series, _ = scan_dicom(src, workers=workers)
    (vol,) = load_series(series[0], workers=workers, decode=decode)
    return save_nifti(vol, out)


def _theirs(src: Path, out: Path) -> Path:
    import dicom2nifti

    dicom2nifti.dicom_series_to_nifti(str(src), str(out), reorient_nifti=False)
    return out


def _same_grid(a: Path, b: Path) -> str:
    """``"yes"`` when both files describe the same voxel grid and values, else what differs."""
    ia, ib = nib.load(a), nib.load(b)
    m = np.linalg.inv(ib.affine) @ ia.affine
    perm = np.rint(m[:3, :3])
    if not (np.allclose(m[:3, :3], perm, atol=1e-3) and np.allclose(np.abs(perm).sum(0), 1)):
        return "no (axes differ)"
    if not np.allclose(m[:3, 3], np.rint(m[:3, 3]), atol=1e-3):
        return "no (shifted)"
    shape = np.abs(perm) @ np.array(ia.shape[:3])
    if tuple(int(s) for s in shape) != tuple(ib.shape[:3]):
        return f"no (shape {ia.shape} vs {ib.shape})"
    ijk = np.stack(np.meshgrid(*[np.arange(0, s, 5) for s in ia.shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    tgt = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(int)
    va = np.asarray(ia.dataobj)[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    vb = np.asarray(ib.dataobj)[tgt[:, 0], tgt[:, 1], tgt[:, 2]]
    diff = float(np.max(np.abs(va.astype(float) - vb)))
    return "yes" if diff == 0 else f"grid yes, values max |diff| {diff:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="medssl decode workers")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dicom2nifti").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = {"TotalSegmentator CT, JPEG 2000 lossless, 512x512x20":
                 args.datasets / "totalsegmentator_example" / "example_ct_dicom",
                 "synthetic CT, uncompressed, 512x512x60": _synthetic(tmp / "synth")}
        rows = []
        for name, src in cases.items():
            times: dict[str, list[float]] = {"threads": [], "processes": [], "theirs": []}
            for r in range(args.repeats + 1):  # run 0 warms caches/imports and is not timed
                tools = list(times) if r % 2 else list(times)[::-1]
                for tool in tools:
                    out = tmp / f"{tool}_{r}.nii.gz"
                    t0 = time.perf_counter()
                    _theirs(src, out) if tool == "theirs" else _ours(src, out, args.workers, tool)
                    if r:
                        times[tool].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            same = _same_grid(tmp / "threads_1.nii.gz", tmp / "theirs_1.nii.gz")
            same_p = _same_grid(tmp / "processes_1.nii.gz", tmp / "theirs_1.nii.gz")
            rows.append((name, med["threads"], med["processes"], med["theirs"], same if same == same_p else
                         f"threads: {same}, processes: {same_p}"))
        # Robustness aside (not timed): the same synthetic series with InstanceNumbers not in spatial order.
        shuffled = _synthetic(tmp / "shuffled", n=12, naming="shuffle")
        try:
            _theirs(shuffled, tmp / "shuffled_theirs.nii.gz")
            d2n_shuffled = "converted"
        except Exception as e:  # dicom2nifti raises its own ConversionError types
            d2n_shuffled = f"fails: {type(e).__name__}: {e}"
        same_shuffled = _same_grid(_ours(shuffled, tmp / "shuffled_ours.nii.gz", 1), tmp / "shuffled_theirs.nii.gz") \
            if d2n_shuffled == "converted" else "n/a"
    import dicom2nifti
    import pydicom

    ver = getattr(dicom2nifti, "__version__", None)
    if ver is None:
        from importlib.metadata import version

        ver = version("dicom2nifti")
    print(f"Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; python {platform.python_version()}, "
          f"pydicom {pydicom.__version__}, dicom2nifti {ver}; medssl decode workers: {args.workers}; "
          f"median of {args.repeats} runs\n")
    print("| series | medssl, thread decode (s) | medssl, process decode (s) | dicom2nifti (s) | speed-up "
          "(threads / processes) | same geometry & values |")
    print("|---|---:|---:|---:|---:|---|")
    for name, mt_, mp_, md, same in rows:
        print(f"| {name} | {mt_:.3f} | {mp_:.3f} | {md:.3f} | {md / mt_:.2f}x / {md / mp_:.2f}x | {same} |")
    print(f"\nSynthetic 512x512x12 CT whose InstanceNumbers are shuffled (positions valid): medssl converts it; "
          f"dicom2nifti {d2n_shuffled} (same geometry: {same_shuffled}).")


if __name__ == "__main__":
    main()
