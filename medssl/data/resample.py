"""Slice-stack geometry for DICOM series: sort, validate, split 4D, resample onto a regular grid.

All positions are DICOM patient coordinates (LPS, mm). For a stack of frames with row direction ``u``,
column direction ``v`` and normal ``n = u x v``, the coordinate of frame ``k`` along the normal is
``d_k = ImagePositionPatient_k · n``; frames are sorted by ``d`` (never by InstanceNumber or file name).

Checks, with dcm2niix-like tolerances:
- duplicate positions (|Δd| < 0.01 mm) without a temporal key → ``duplicate_slices``;
- a step ≈ k × the median step (k ≥ 2, within 15 %) → ``missing_slices`` (always quarantined);
- a step deviating from the median by more than max(0.01 mm, 1 %) → ``uneven_spacing``;
- slice origins shifted in-plane (> 0.02 mm) as the stack advances, i.e. the stacking direction is not
  the normal → ``gantry_tilt`` (angle in degrees; GantryDetectorTilt (0018,1120) is quoted too).

`resample_stack` handles tilt and uneven steps in one code path: every output voxel of an orthogonal grid
(axes ``u``, ``v``, ``n``) is interpolated at its true physical position — linearly between the two
bracketing slice planes along ``n``, bilinearly within each plane using that slice's own origin.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medssl.data.dicom_types import DicomFrame
from medssl.errors import QuarantineError

__all__ = ["Problem", "StackReport", "sort_frames", "split_temporal", "check_stack", "resample_stack"]

DUP_TOL_MM = 0.01
UNEVEN_ABS_MM = 0.01
UNEVEN_REL = 0.01
MISSING_REL = 0.15
TILT_OFFSET_MM = 0.02
ORIENT_TOL = 1e-3


@dataclass
class Problem:
    """One geometry problem: ``reason`` code, human ``detail``, and a ``short`` form for notes."""

    reason: str
    detail: str
    short: str


@dataclass
class StackReport:
    """Result of `check_stack`: unit ``normal`` (LPS), ``steps`` along it (mm), problems and warnings."""

    normal: np.ndarray
    steps: np.ndarray
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _normal(frame: DicomFrame) -> np.ndarray:
    o = np.asarray(frame.orientation, dtype=float)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def sort_frames(frames: Sequence[DicomFrame]) -> tuple[list[DicomFrame], np.ndarray]:
    """Sort frames by position along the first frame's normal; returns ``(frames, d)`` with ``d`` ``(N,)`` mm."""
    n = _normal(frames[0])
    d = np.array([float(np.dot(np.asarray(f.position, float), n)) for f in frames])
    order = sorted(range(len(frames)), key=lambda i: (d[i], frames[i].instance_number, frames[i].frame_index))
    return [frames[i] for i in order], d[order]


def _fmt_counts(counter: Counter) -> str:
    return ", ".join(f"{k} ({c} frames)" for k, c in sorted(counter.items(), key=lambda kv: -kv[1]))


def _check_uniform(frames: Sequence[DicomFrame]) -> None:
    f0 = frames[0]
    path = f0.path.parent
    sizes = Counter(f"{f.rows}x{f.cols}" for f in frames)
    if len(sizes) > 1:
        raise QuarantineError("mixed_image_size", f"image sizes (rows x cols) differ: {_fmt_counts(sizes)}", path)
    o0 = np.asarray(f0.orientation, float)
    if any(np.max(np.abs(np.asarray(f.orientation, float) - o0)) > ORIENT_TOL for f in frames):
        orients = Counter(" ".join(f"{x:.3f}" for x in np.asarray(f.orientation, float)) for f in frames)
        raise QuarantineError("mixed_orientation", f"ImageOrientationPatient differs: {_fmt_counts(orients)}", path)
    ps0 = np.asarray(f0.pixel_spacing, float)
    if any(np.max(np.abs(np.asarray(f.pixel_spacing, float) - ps0)) > 1e-3 * ps0.max() for f in frames):
        spacings = Counter("x".join(f"{x:.4g}" for x in f.pixel_spacing) for f in frames)
        raise QuarantineError("mixed_pixel_spacing", f"PixelSpacing differs: {_fmt_counts(spacings)} mm", path)


def _duplicates(d_sorted: np.ndarray) -> np.ndarray:
    """Indices ``k`` (into sorted ``d``) whose position equals the previous one."""
    return np.nonzero(np.diff(d_sorted) < DUP_TOL_MM)[0] + 1


def _key_order(keys: list[object]) -> list[object]:
    try:
        return sorted(keys)  # type: ignore[type-var]
    except TypeError:
        return sorted(keys, key=repr)


def split_temporal(frames: Sequence[DicomFrame]) -> list[list[DicomFrame]]:
    """Check a series is one consistent stack, or split it into 3D stacks by ``temporal_key``.

    A series is 4D only when positions repeat and the repeats are told apart by a temporal key: the frames'
    ``temporal_key``, else the first of ``extra["temporal_candidates"]`` (e.g. acquisition number) that
    splits the series into stacks without repeated positions. Temporal keys are ignored when every
    position is distinct (e.g. per-slice AcquisitionNumber in CT).

    Raises:
        QuarantineError: ``mixed_image_size``, ``mixed_orientation``, ``mixed_pixel_spacing``,
            ``duplicate_slices`` (repeated positions not separated by temporal keys).
    """
    frames = list(frames)
    _check_uniform(frames)
    srt, d = sort_frames(frames)
    dup = _duplicates(d)
    if dup.size == 0:
        return [frames]
    path = frames[0].path.parent
    for key in _temporal_key_functions(frames):
        groups: dict[object, list[DicomFrame]] = defaultdict(list)
        for f in frames:
            groups[key(f)].append(f)
        if len(groups) > 1 and all(_duplicates(sort_frames(g)[1]).size == 0 for g in groups.values()):
            return [groups[k] for k in _key_order(list(groups))]
    raise QuarantineError("duplicate_slices", f"{dup.size} frame(s) repeat a slice position (e.g. at "
                          f"{d[dup[0]]:.2f} mm along the slice normal) and no temporal key (temporal position, "
                          "b-value, trigger time, acquisition number) separates them", path)


def _temporal_key_functions(frames: Sequence[DicomFrame]) -> list:
    """Candidate temporal keys in precedence order: ``temporal_key``, then ``extra["temporal_candidates"]``."""
    fns = []
    if all(f.temporal_key is not None for f in frames):
        fns.append(lambda f: f.temporal_key)
    names: list[str] = []
    for f in frames:
        for name in f.extra.get("temporal_candidates", {}) or {}:
            if name not in names:
                names.append(name)
    for name in names:
        if all(name in (f.extra.get("temporal_candidates") or {}) for f in frames):
            fns.append(lambda f, name=name: f.extra["temporal_candidates"][name])
    return fns


def _runs(values: np.ndarray) -> str:
    """Run-length summary such as ``4.22 mm x13, 1.14 mm x1, 7.38 mm x13``."""
    out: list[list] = []
    for v in np.round(values, 2):
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    if len(out) > 6:
        return f"{values.min():.2f}-{values.max():.2f} mm in {len(out)} runs"
    return ", ".join(f"{v:.2f} mm x{c}" for v, c in out)


def check_stack(frames: Sequence[DicomFrame], d: np.ndarray) -> StackReport:
    """Geometry of sorted frames (from `sort_frames`): missing slices, uneven steps, gantry tilt."""
    n = _normal(frames[0])
    pos = np.array([np.asarray(f.position, float) for f in frames])
    steps = np.diff(d)
    report = StackReport(normal=n, steps=steps)
    gdt = frames[0].extra.get("gantry_detector_tilt")
    if len(frames) < 2:
        return report
    rel = pos - pos[0]
    inplane = rel - np.outer(rel @ n, n)
    off = np.linalg.norm(inplane, axis=1)
    if off.max() > TILT_OFFSET_MM:
        angle = math.degrees(math.atan2(float(off[-1]), float(d[-1] - d[0])))
        quoted = f"; GantryDetectorTilt {float(gdt):g} deg" if gdt is not None else ""
        detail = (f"gantry tilt {angle:.1f} deg (slice origins shift up to {off.max():.2f} mm in-plane along the "
                  f"stack{quoted})")
        report.problems.append(Problem("gantry_tilt", detail, f"gantry_tilt {angle:.1f} deg"))
    elif gdt is not None and abs(float(gdt)) > 0.01:
        report.warnings.append(f"GantryDetectorTilt {float(gdt):g} deg but slice positions are orthogonal")
    med = float(np.median(steps))
    ratio = steps / med
    mult = np.rint(ratio)
    missing = np.nonzero((mult >= 2) & (np.abs(ratio - mult) < MISSING_REL))[0]
    if missing.size:
        parts, total = [], 0
        for k in missing:
            m = int(mult[k])
            total += m - 1
            where = [pos[k] + j / m * (pos[k + 1] - pos[k]) for j in range(1, m)]
            at = "; ".join("(" + ", ".join(f"{x:.2f}" for x in p) + ")" for p in where[:3])
            parts.append(f"gap of {steps[k]:.2f} mm ({m}x the {med:.2f} mm step) after sorted slice {k}: "
                         f"missing at LPS {at} mm")
        detail = f"{total} slice(s) missing: " + "; ".join(parts[:5])
        report.problems.append(Problem("missing_slices", detail, f"missing_slices {total}"))
    else:
        dev = np.abs(steps - med)
        if np.any(dev > max(UNEVEN_ABS_MM, UNEVEN_REL * med)):
            dist = np.linalg.norm(np.diff(pos, axis=0), axis=1)
            detail = (f"uneven slice spacing: steps between slice positions {_runs(dist)} "
                      f"({steps.min():.2f}-{steps.max():.2f} mm along the normal, median {med:.2f} mm)")
            report.problems.append(Problem("uneven_spacing", detail,
                                           f"uneven spacing {steps.min():.2f}-{steps.max():.2f} mm"))
    return report


def _window(plane: np.ndarray, r0: int, c0: int, nr: int, nc: int) -> np.ndarray:
    """``plane[r0:r0+nr, c0:c0+nc]`` with NaN where the window leaves the plane."""
    out = np.full((nr, nc), np.nan, dtype=np.float32)
    rows, cols = plane.shape
    rs, re = max(r0, 0), min(r0 + nr, rows)
    cs, ce = max(c0, 0), min(c0 + nc, cols)
    if rs < re and cs < ce:
        out[rs - r0:re - r0, cs - c0:ce - c0] = plane[rs:re, cs:ce]
    return out


def _split(x: float) -> tuple[int, float]:
    """Integer part and fraction, snapping fractions within 1e-6 of 0/1 (exact at whole-pixel shifts)."""
    base = math.floor(x)
    frac = x - base
    if frac > 1 - 1e-6:
        return base + 1, 0.0
    return base, (0.0 if frac < 1e-6 else frac)


def _shifted(plane: np.ndarray, r: float, c: float, nr: int, nc: int) -> np.ndarray:
    """Bilinear sample of ``plane`` at rows ``r + i``, cols ``c + j`` (``i < nr``, ``j < nc``); NaN outside.

    Hand-written because the in-plane map is a pure translation: the four bilinear weights are the same
    for every pixel, so four shifted windows replace a general `map_coordinates` call, are exact at
    whole-pixel shifts and never let the NaN border bleed in through zero weights.
    """
    rb, fr = _split(r)
    cb, fc = _split(c)
    out = np.zeros((nr, nc), dtype=np.float32)
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            if wr * wc > 0:
                out += np.float32(wr * wc) * _window(plane, rb + dr, cb + dc, nr, nc)
    return out


def resample_stack(planes: np.ndarray, frames: Sequence[DicomFrame], d: np.ndarray,
                   target_slice_spacing: float | None = None) -> tuple[np.ndarray, np.ndarray, float, str]:
    """Interpolate a sheared and/or unevenly spaced stack onto a regular orthogonal grid.

    Args:
        planes: ``(N, rows, cols)`` float32 pixel planes of the sorted frames.
        frames: the sorted frames (positions, orientation, pixel spacing).
        d: ``(N,)`` ascending positions along the normal (mm).
        target_slice_spacing: output step along the normal (mm); default the median observed step.

    Returns:
        ``(out, origin, step, note)``: ``out`` ``(M, R, C)`` planes of the new grid (same in-plane pixel
        size; R x C covers the union of all shifted slices, pixels aligned with slice 0; voxels outside every
        slice hold the stack minimum), ``origin`` the LPS position of ``out[0, 0, 0]``, ``step`` in mm and a
        short note for the metadata.
    """
    f0 = frames[0]
    o = np.asarray(f0.orientation, float)
    u, v = o[:3], o[3:]
    ps_row, ps_col = float(f0.pixel_spacing[0]), float(f0.pixel_spacing[1])
    pos = np.array([np.asarray(f.position, float) for f in frames])
    rel = pos - pos[0]
    a = rel @ u / ps_col  # column offset of each slice origin, in pixels of slice 0
    b = rel @ v / ps_row  # row offset
    dd = np.asarray(d, float) - float(d[0])
    step = float(target_slice_spacing) if target_slice_spacing else float(np.median(np.diff(dd)))
    m_out = int(math.floor(dd[-1] / step + 1e-6)) + 1
    cmin, cmax = math.floor(a.min() + 1e-6), math.ceil(a.max() + f0.cols - 1 - 1e-6)
    rmin, rmax = math.floor(b.min() + 1e-6), math.ceil(b.max() + f0.rows - 1 - 1e-6)
    nr, nc = rmax - rmin + 1, cmax - cmin + 1
    fill = float(np.nanmin(planes))
    out = np.empty((m_out, nr, nc), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}

    def sample(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 2:
                cache.pop(min(cache))
            cache[k] = _shifted(planes[k], rmin - b[k], cmin - a[k], nr, nc)
        return cache[k]

    n = len(frames)
    for m in range(m_out):
        t = m * step
        k = int(np.clip(np.searchsorted(dd, t, side="right") - 1, 0, max(n - 2, 0)))
        w = (t - dd[k]) / (dd[k + 1] - dd[k]) if n > 1 else 0.0
        if w < 1e-6:
            val = sample(k)
        elif w > 1 - 1e-6:
            val = sample(k + 1)
        else:
            val = np.float32(1 - w) * sample(k) + np.float32(w) * sample(k + 1)
        out[m] = np.where(np.isnan(val), fill, val)
    origin = pos[0] + cmin * ps_col * u + rmin * ps_row * v
    note = f"{m_out} planes of {nr}x{nc} px covering all shifted slices; outside filled with {fill:g}"
    return out, origin, step, note
