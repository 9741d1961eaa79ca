"""`medssl ingest`: NIfTI / DICOM / MedMNIST inputs → PHI-free MONAI datalist, manifest and quarantine report.

Writes into ``out``:

- ``datalist.json``: MONAI decathlon format (``monai.data.load_decathlon_datalist`` reads it) with sections
  ``training`` (labelled), ``validation``/``test`` (official splits, MedMNIST), ``unlabeled``; items
  ``{"image", "label"?, "class"?, "case_id", "group_id", "channels"?}``, paths relative to the datalist file;
  a multi-channel item's ``image`` is the list of its channel files in ``channels`` order. Top-level
  ``"labels"``: the class table (``{"0": "background", "1": "liver", …}``) when one is known.
- ``manifest.csv``: one row per accepted item (case id, group id, format, channels, shape, spacing mm,
  orientation, modality, dtype, intensity percentiles, sha256 of the referenced/converted file). No DICOM
  identifiers.
- ``quarantine.csv``: one row per rejected input (path, reason code, detail).
- ``warnings.csv``: ingested inputs that look suspicious (``looks_like_label``: an image with ≤ 32 distinct
  non-negative integer values); they are in the datalist, and the exit code does not change.
- ``nifti/<case_id>.nii.gz``: DICOM series converted once (and NIfTI copies with ``copy_nifti=True``);
  ``nifti/<case_id>_label.nii.gz`` merged per-structure masks with their class table ``nifti/labels.json``.
- ``.medssl/state.json``: per-input fingerprints (size, mtime, options) so a re-run skips unchanged inputs;
  ``.medssl/salt``: the secret salt of the case ids (keep it out of shared copies).

Every bad input is quarantined with a specific reason; everything else of the run is still ingested.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from medssl.data.discover import Discovery, discover
from medssl.data.ingest_workers import (
    DicomTask,
    NiftiTask,
    TaskResult,
    fingerprint,
    ingest_dicom_series,
    ingest_medmnist,
    ingest_nifti,
)
from medssl.data.pairing import parse_group_by
from medssl.data.structures import class_table, label_names
from medssl.errors import MedsslError

__all__ = ["IngestOptions", "IngestReport", "ingest", "MANIFEST_FIELDS", "QUARANTINE_FIELDS", "WARNING_FIELDS"]

log = logging.getLogger(__name__)

MANIFEST_FIELDS = [
    "case_id", "group_id", "section", "source_format", "image", "channels", "label", "class", "shape",
    "spacing_mm", "orientation", "modality", "dtype", "min", "p0_5", "p50", "p99_5", "max", "label_classes",
    "sha256", "notes",
]
QUARANTINE_FIELDS = ["path", "reason", "detail"]
WARNING_FIELDS = ["path", "case_id", "reason", "detail"]
#: bumped when the items of an input change shape (2: group_id, channels): older state is re-ingested
TASK_FORMAT = "2"
SECTIONS = ("training", "validation", "test", "unlabeled")


@dataclass
class IngestOptions:
    """How inputs are converted.

    Args:
        tilt: gantry-tilted DICOM series: ``"quarantine"`` (safe default) or ``"resample"`` onto a regular grid.
        uneven: DICOM series with uneven slice spacing: ``"quarantine"`` (default) or ``"resample"``.
        four_d: 4D DICOM series (fMRI/DWI/dynamic): ``"split"`` into 3D volumes (default) or ``"quarantine"``.
        copy_nifti: copy NIfTI inputs to ``nifti/<case_id>.nii.gz`` (hides original file names, which may hold
            identifiers) instead of referencing them in place.
        salt: secret used in the case-id hash; default: read or create ``out/.medssl/salt``.
        group_by: how NIfTI cases are grouped into patients (``group_id``): ``case`` (default: the case folder,
            or the case key of the file name in layout folders such as ``imagesTr``), ``parent``, ``file`` or
            ``regex:<pattern>`` (see `medssl.data.pairing.group_key`).
    """

    tilt: str = "quarantine"
    uneven: str = "quarantine"
    four_d: str = "split"
    copy_nifti: bool = False
    salt: str | None = None
    group_by: str = "case"

    def __post_init__(self) -> None:
        parse_group_by(self.group_by)
        for name, allowed in (("tilt", ("quarantine", "resample")), ("uneven", ("quarantine", "resample")),
                              ("four_d", ("split", "quarantine"))):
            if getattr(self, name) not in allowed:
                raise MedsslError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("salt")
        return json.dumps(d, sort_keys=True)


@dataclass
class IngestReport:
    out: Path
    datalist: Path
    manifest: Path
    quarantine: Path
    counts: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    reused: int = 0
    processed: int = 0

    @property
    def n_accepted(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        """0: everything ingested; 3: some inputs quarantined (see quarantine.csv)."""
        return 3 if self.quarantined else 0


def _salt(out: Path, salt: str | None) -> str:
    if salt:
        return salt
    env = os.environ.get("MEDSSL_SALT")
    if env:
        return env
    p = out / ".medssl" / "salt"
    if p.is_file():
        return p.read_text().strip()
    p.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(16)
    p.write_text(value)
    os.chmod(p, 0o600)
    return value


def _load_state(out: Path) -> dict[str, dict]:
    p = out / ".medssl" / "state.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("%s is corrupt; re-ingesting everything", p)
        return {}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run(tasks: list, fn: Callable, workers: int, progress: Callable[[int], None]) -> Iterable[TaskResult]:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
            progress(1)
        return
    # spawn: safe with threads (pylibjpeg/openmp) and identical on every OS.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        chunk = max(1, min(16, len(tasks) // (workers * 4)))
        for r in pool.map(fn, tasks, chunksize=chunk):
            yield r
            progress(1)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def ingest(
    sources: list[str | Path],
    out: str | Path,
    *,
    labels: list[str | Path] | None = None,
    workers: int = 1,
    options: IngestOptions | None = None,
    progress: bool = False,
) -> IngestReport:
    """Ingest ``sources`` into ``out`` (see module docstring). Returns the report; never raises for one bad input.

    Raises:
        MedsslError: a source is missing, or no ingestible input was found at all.
    """
    opts = options or IngestOptions()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    salt = _salt(out, opts.salt)
    found: Discovery = discover([Path(s) for s in sources], [Path(p) for p in labels or []], group_by=opts.group_by)
    if not (found.nifti or found.dicom_candidates or found.npz):
        raise MedsslError(f"no NIfTI, DICOM or MedMNIST input found in {', '.join(map(str, sources))}")

    state = _load_state(out)
    new_state: dict[str, dict] = {}
    results: list[TaskResult] = []
    common = {"out": str(out), "salt": salt, "options": asdict(opts) | {"salt": None}}

    table = class_table(c.structures for c in found.nifti if c.structures)
    nifti_tasks: list[NiftiTask] = []
    for case in found.nifti:
        t = NiftiTask(images=[str(p) for p in case.images], label=str(case.label) if case.label else None,
                      section=case.section, key=case.key, modality=case.modality, channels=case.channels,
                      structures={k: str(v) for k, v in case.structures.items()} if case.structures else None,
                      class_table=table if case.structures else None, group=case.group,
                      n_channels=case.n_channels, **common)
        inputs = [*case.images, *([case.label] if case.label else []), *(case.structures or {}).values()]
        extra = json.dumps([opts.fingerprint(), TASK_FORMAT, t.group, t.channels, t.class_table, t.section])
        fp = fingerprint(inputs, extra)
        key = _nifti_state_key(t)
        prev = state.get(key)
        if prev and prev.get("fp") == fp and _outputs_exist(out, prev["result"]):
            results.append(TaskResult.from_dict(prev["result"]))
        else:
            nifti_tasks.append(t)
        new_state[key] = {"fp": fp}
    reused = len(results)

    from medssl.data.dicom import group_dicom_files  # local: keeps discovery importable without pydicom

    dicom_groups, dicom_bad = (group_dicom_files(found.dicom_candidates, workers=workers)
                               if found.dicom_candidates else ([], []))
    dicom_tasks: list[DicomTask] = []
    for files, label in dicom_groups:
        key = "dicom:" + "|".join(sorted(files))
        fp = fingerprint([Path(f) for f in files], opts.fingerprint() + TASK_FORMAT)  # older results: no group_id
        prev = state.get(key)
        if prev and prev.get("fp") == fp and _outputs_exist(out, prev["result"]):
            results.append(TaskResult.from_dict(prev["result"]))
            reused += 1
        else:
            dicom_tasks.append(DicomTask(files=files, description=label, **common))
        new_state[key] = {"fp": fp}
    pre_quarantine = [{"path": str(p), "reason": r, "detail": d} for p, r, d in dicom_bad]
    pre_quarantine += [{"path": p, "reason": r, "detail": d} for p, r, d in found.quarantine]

    total = len(nifti_tasks) + len(dicom_tasks) + len(found.npz)
    with _progress_bar(progress) as bar:
        task_id = bar.add_task("ingest", total=total)
        advance = lambda n: bar.advance(task_id, n)  # noqa: E731
        for t, res in zip(nifti_tasks, _run(nifti_tasks, ingest_nifti, workers, advance), strict=True):
            results.append(res)
            new_state[_nifti_state_key(t)]["result"] = res.to_dict()
        for res in _run(dicom_tasks, ingest_dicom_series, workers, advance):
            results.append(res)
            new_state["dicom:" + "|".join(sorted(res.files))]["result"] = res.to_dict()
        for npz in found.npz:
            results.append(ingest_medmnist(npz, out=out, salt=salt))
            advance(1)

    names = label_names(table) if table else found.label_names
    if table:
        _atomic_write(out / "nifti" / "labels.json", json.dumps(names, indent=1))
    report = _write_outputs(out, results, pre_quarantine, names)
    report.reused, report.processed = reused, total
    for key, entry in new_state.items():  # reused inputs keep their previous result
        if "result" not in entry and key in state:
            new_state[key] = state[key]
    _atomic_write(out / ".medssl" / "state.json",
                  json.dumps({k: v for k, v in new_state.items() if "result" in v}))
    log.info("ingested %d volumes (%s), %d quarantined, %d warnings, %d unchanged inputs skipped",
             report.n_accepted, ", ".join(f"{k} {v}" for k, v in report.counts.items() if v),
             len(report.quarantined), len(report.warnings), reused)
    return report


def _nifti_state_key(task: NiftiTask) -> str:
    return "nifti:" + "|".join(task.images)


def _outputs_exist(out: Path, result: dict) -> bool:
    """Every file an earlier result's items point to (all channels, the label) is still there."""
    paths = []
    for item in result.get("items", []):
        paths += item["image"] if isinstance(item["image"], list) else [item["image"]]
        paths += [item["label"]] if item.get("label") else []
    return all((out / p).exists() for p in paths)


def _write_outputs(out: Path, results: list[TaskResult], pre_quarantine: list[dict],
                   names: dict[str, str] | None = None) -> IngestReport:
    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    manifest: list[dict] = []
    quarantine = list(pre_quarantine)
    warnings: list[dict] = []
    seen: dict[str, str] = {}
    for res in results:
        for item, row in zip(res.items, res.rows, strict=True):
            cid = item["case_id"]
            if cid in seen:
                quarantine.append({"path": res.source, "reason": "duplicate_case",
                                   "detail": f"same case id as {seen[cid]} (identical input given twice?)"})
                continue
            seen[cid] = res.source
            sections[row["section"]].append(item)
            manifest.append(row)
        quarantine.extend(res.quarantine)
        warnings.extend(res.warnings)
    for s in sections.values():
        s.sort(key=lambda it: it["case_id"])
    manifest.sort(key=lambda r: (r["section"], r["case_id"]))
    quarantine.sort(key=lambda r: (r["path"], r["reason"]))
    warnings.sort(key=lambda r: (r["path"], r["reason"]))
    datalist = {"name": out.name, "description": "written by medssl ingest", **({"labels": names} if names else {}),
                **sections}
    _atomic_write(out / "datalist.json", json.dumps(datalist, indent=1))
    for name, rows, fields in (("manifest.csv", manifest, MANIFEST_FIELDS),
                               ("quarantine.csv", quarantine, QUARANTINE_FIELDS),
                               ("warnings.csv", warnings, WARNING_FIELDS)):
        tmp = out / f"{name}.tmp"
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out / name)
    return IngestReport(out=out, datalist=out / "datalist.json", manifest=out / "manifest.csv",
                        quarantine=out / "quarantine.csv", counts={k: len(v) for k, v in sections.items()},
                        quarantined=quarantine, warnings=warnings)
