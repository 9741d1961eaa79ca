"""Per-input ingest work (runs in worker processes): one NIfTI case, one DICOM series, one MedMNIST file.

Each function takes a picklable task and returns a `TaskResult` holding datalist items, manifest rows and
quarantine rows; a bad input never raises out of here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medssl.errors import QuarantineError

__all__ = ["NiftiTask", "DicomTask", "TaskResult", "fingerprint", "sha256_file", "ingest_nifti",
           "ingest_dicom_series", "ingest_medmnist"]

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    source: str
    files: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskResult:
        return cls(**d)


@dataclass
class NiftiTask:
    image: str
    label: str | None
    section: str
    key: str
    out: str
    salt: str
    options: dict
    modality: str = "unknown"


@dataclass
class DicomTask:
    files: list[str]
    description: str
    out: str
    salt: str
    options: dict


def fingerprint(paths: list[Path], extra: str = "") -> str:
    """Cheap change detector: sha256 over (path, size, mtime_ns) of each file plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for p in sorted(str(x) for x in paths):
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{p}|missing".encode())
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _rel(path: str | Path, out: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


def _row(case_id: str, section: str, fmt: str, image_rel: str, label_rel: str, array: np.ndarray,
         spacing: np.ndarray, orientation: str, modality: str, dtype: str, sha: str, label_classes: str = "",
         notes: str = "", klass: str = "") -> dict:
    from medssl.data.validation import intensity_stats

    st = intensity_stats(array)
    return {
        "case_id": case_id, "section": section, "source_format": fmt, "image": image_rel, "label": label_rel,
        "class": klass, "shape": "x".join(str(int(s)) for s in array.shape),
        "spacing_mm": ",".join(f"{float(s):.4g}" for s in spacing), "orientation": orientation,
        "modality": modality, "dtype": dtype, "min": f"{st['min']:.6g}", "p0_5": f"{st['p0.5']:.6g}",
        "p50": f"{st['p50']:.6g}", "p99_5": f"{st['p99.5']:.6g}", "max": f"{st['max']:.6g}",
        "label_classes": label_classes, "sha256": sha, "notes": notes,
    }


def _guarded(fn):
    """An unexpected exception in one input becomes a quarantine row (``internal_error``), never a crash."""

    @functools.wraps(fn)
    def wrapper(task):
        try:
            return fn(task)
        except QuarantineError:
            raise
        except Exception as e:  # noqa: BLE001 - by design: one bad input must not stop the batch
            source = getattr(task, "image", None) or getattr(task, "description", None) or str(task)
            log.debug("unexpected error on %s", source, exc_info=True)
            return TaskResult(source=str(source), files=list(getattr(task, "files", []) or [str(source)]),
                              quarantine=[{"path": str(source), "reason": "internal_error",
                                           "detail": f"{type(e).__name__}: {e}"}])

    return wrapper


@_guarded
def ingest_nifti(task: NiftiTask) -> TaskResult:
    """Load, validate and register one NIfTI image (+ optional label map)."""
    from medssl.data.nifti import load_nifti, orientation_code
    from medssl.data.phi import case_id as make_case_id
    from medssl.data.validation import squeeze_to_3d, validate_image, validate_label

    res = TaskResult(source=task.image, files=[task.image] + ([task.label] if task.label else []))
    try:
        img = load_nifti(task.image)
        array = squeeze_to_3d(img.array, task.image)
        validate_image(array, img.affine, task.image)
    except QuarantineError as e:
        res.quarantine.append({"path": task.image, "reason": e.reason, "detail": e.detail})
        if task.label:
            res.quarantine.append({"path": task.label, "reason": "image_quarantined",
                                   "detail": f"its image was quarantined ({e.reason})"})
        return res
    section, label_rel, classes, notes = task.section, "", "", ""
    label_arr = None
    if task.label:
        try:
            lab = load_nifti(task.label)
            label_arr = validate_label(squeeze_to_3d(lab.array, task.label), lab.affine, array.shape,
                                       img.affine, task.label)
            classes = " ".join(str(int(v)) for v in np.unique(label_arr))
        except QuarantineError as e:
            res.quarantine.append({"path": task.label, "reason": e.reason,
                                   "detail": f"{e.detail}; image kept in the unlabeled pool"})
            section, label_arr, notes = "unlabeled", None, f"label quarantined: {e.reason}"
    cid = make_case_id(task.key, task.salt)
    out = Path(task.out)
    image_path, label_path = Path(task.image), Path(task.label) if label_arr is not None else None
    if task.options.get("copy_nifti"):
        (out / "nifti").mkdir(parents=True, exist_ok=True)
        ext = ".nii.gz" if image_path.name.endswith(".gz") else ".nii"
        dst = out / "nifti" / f"{cid}{ext}"
        shutil.copyfile(image_path, dst)
        image_path = dst
        if label_path is not None:
            ldst = out / "nifti" / f"{cid}_label{'.nii.gz' if label_path.name.endswith('.gz') else '.nii'}"
            shutil.copyfile(label_path, ldst)
            label_path = ldst
    item = {"image": _rel(image_path, out), "case_id": cid}
    if label_path is not None:
        item["label"] = label_rel = _rel(label_path, out)
    res.items.append(item)
    res.rows.append(_row(cid, section, "nifti", item["image"], label_rel, array, img.spacing,
                         orientation_code(img.affine), task.modality, str(img.dtype), sha256_file(image_path),
                         classes, notes))
    return res


@_guarded
def ingest_dicom_series(task: DicomTask) -> TaskResult:
    """Convert one DICOM series (one or more 3D volumes) to NIfTI under ``out/nifti``."""
    from medssl.data.dicom import read_dicom_files, save_nifti
    from medssl.data.nifti import orientation_code
    from medssl.data.phi import case_id as make_case_id
    from medssl.data.validation import validate_image

    res = TaskResult(source=task.description, files=list(task.files))
    opts = task.options
    try:
        volumes = read_dicom_files([Path(f) for f in task.files], tilt=opts["tilt"], uneven=opts["uneven"],
                                   four_d=opts["four_d"])
    except QuarantineError as e:
        res.quarantine.append({"path": e.path or task.description, "reason": e.reason, "detail": e.detail})
        return res
    out = Path(task.out)
    (out / "nifti").mkdir(parents=True, exist_ok=True)
    for vol in volumes:
        try:
            validate_image(vol.array, vol.affine, task.description)
        except QuarantineError as e:
            res.quarantine.append({"path": task.description, "reason": e.reason, "detail": e.detail})
            continue
        identity = vol.identity or "|".join(sorted(Path(f).name for f in vol.source_files))
        if vol.temporal_index is not None and not vol.identity:
            identity += f"|t{vol.temporal_index}"
        cid = make_case_id(identity, task.salt)
        dst = out / "nifti" / f"{cid}.nii.gz"
        save_nifti(vol, dst)
        spacing = np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))
        notes = "; ".join(str(n) for n in vol.meta.get("notes", []))
        item = {"image": _rel(dst, out), "case_id": cid}
        res.items.append(item)
        res.rows.append(_row(cid, "unlabeled", "dicom", item["image"], "", vol.array, spacing,
                             orientation_code(vol.affine), str(vol.modality or "unknown"), str(vol.array.dtype),
                             sha256_file(dst), notes=notes))
    return res


def ingest_medmnist(npz: Path, *, out: Path, salt: str) -> TaskResult:
    """Convert a MedMNIST 3D ``.npz`` into NIfTI + classification items with the official splits."""
    from medssl.data.medmnist import convert_medmnist, read_medmnist
    from medssl.errors import MedsslError

    res = TaskResult(source=str(npz), files=[str(npz)])
    stem = npz.name[: -len(".npz")]
    try:
        data = read_medmnist(npz)  # read once: the manifest statistics below use the same arrays
        items = convert_medmnist(npz, out / "medmnist" / stem, salt=salt, data=data)
    except MedsslError as e:
        res.quarantine.append({"path": str(npz), "reason": "bad_medmnist", "detail": str(e)})
        return res
    section_of = {"training": "training", "validation": "validation", "test": "test",
                  "train": "training", "val": "validation"}
    for it in items:
        split_name, idx = it["source_index"].split("/")
        array = data[split_name][0][int(idx)]
        section = section_of[it["split"]]
        image_abs = Path(it["image"]) if Path(it["image"]).is_absolute() else out / "medmnist" / stem / it["image"]
        item = {"image": _rel(image_abs, out), "class": int(it["class"]), "case_id": it["case_id"]}
        res.items.append(item)
        res.rows.append(_row(item["case_id"], section, "medmnist", item["image"], "", array,
                             np.ones(3), "RAS", "MEDMNIST", str(array.dtype), sha256_file(image_abs),
                             klass=str(item["class"])))
    return res
