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
    """What one input gave: datalist items, manifest rows (one per item), quarantine and warning rows."""

    source: str
    files: list[str] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskResult:
        return cls(**d)


@dataclass
class NiftiTask:
    """One NIfTI case (see `medssl.data.pairing.NiftiCase`); ``group`` is the unsalted patient key."""

    images: list[str]
    label: str | None
    section: str
    key: str
    out: str
    salt: str
    options: dict
    modality: str = "unknown"
    channels: list[str] | None = None
    structures: dict[str, str] | None = None
    class_table: dict[str, int] | None = None
    group: str = ""
    n_channels: int = 1


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


def _row(case_id: str, section: str, fmt: str, image_rel: str, label_rel: str, array: np.ndarray | list[np.ndarray],
         spacing: np.ndarray, orientation: str, modality: str, dtype: str, sha: str, label_classes: str = "",
         notes: str = "", klass: str = "", group_id: str = "", channels: str = "") -> dict:
    """One manifest row; a multi-channel case gives per-channel statistics joined by ``;``."""
    from medssl.data.validation import intensity_stats

    arrays = array if isinstance(array, list) else [array]
    st = [intensity_stats(a) for a in arrays]
    stat = lambda k: ";".join(f"{s[k]:.6g}" for s in st)  # noqa: E731
    return {
        "case_id": case_id, "group_id": group_id or case_id, "section": section, "source_format": fmt,
        "image": image_rel, "channels": channels, "label": label_rel, "class": klass,
        "shape": "x".join(str(int(s)) for s in arrays[0].shape),
        "spacing_mm": ",".join(f"{float(s):.4g}" for s in spacing), "orientation": orientation,
        "modality": modality, "dtype": dtype, "min": stat("min"), "p0_5": stat("p0.5"), "p50": stat("p50"),
        "p99_5": stat("p99.5"), "max": stat("max"), "label_classes": label_classes, "sha256": sha, "notes": notes,
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
            source = (getattr(task, "images", None) or [None])[0] or getattr(task, "description", None) or str(task)
            log.debug("unexpected error on %s", source, exc_info=True)
            return TaskResult(source=str(source), files=list(getattr(task, "files", []) or [str(source)]),
                              quarantine=[{"path": str(source), "reason": "internal_error",
                                           "detail": f"{type(e).__name__}: {e}"}])

    return wrapper


def _copy(src: Path, out: Path, name: str) -> Path:
    """``--copy-nifti``: ``out/nifti/<name>.nii[.gz]``."""
    dst = out / "nifti" / (name + (".nii.gz" if src.name.endswith(".gz") else ".nii"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _reject_case(res: TaskResult, task: NiftiTask, e: QuarantineError, what: str) -> TaskResult:
    """The whole case is quarantined: a row for the offending file, ``image_quarantined`` for the others."""
    bad = e.path or task.images[0]
    res.quarantine.append({"path": bad, "reason": e.reason, "detail": e.detail})
    for f in [*task.images, *([task.label] if task.label else [])]:
        if f != bad:
            res.quarantine.append({"path": f, "reason": "image_quarantined",
                                   "detail": f"its case was quarantined ({e.reason} in {what})"})
    return res


@_guarded
def ingest_nifti(task: NiftiTask) -> TaskResult:
    """Load, validate and register one NIfTI case: image channel(s) + optional label map or structure masks."""
    from medssl.data.nifti import orientation_code, save_nifti
    from medssl.data.nifti_case import load_case_image
    from medssl.data.phi import case_id as make_case_id
    from medssl.data.structures import merge_structures
    from medssl.data.validation import looks_like_label

    files = [*task.images, *([task.label] if task.label else []), *(task.structures or {}).values()]
    res = TaskResult(source=task.images[0], files=files)
    try:
        img = load_case_image(task.images, task.channels, task.n_channels)
    except QuarantineError as e:
        return _reject_case(res, task, e, Path(e.path or task.images[0]).name)
    cid = make_case_id(task.key, task.salt)
    out = Path(task.out)
    section, label_rel, classes, notes = task.section, "", "", ""
    label_path: Path | None = None
    label_arr = None
    if task.label:
        try:
            label_arr = _checked_label(task.label, img.shape, img.affine)
            label_path = Path(task.label)
        except QuarantineError as e:
            res.quarantine.append({"path": task.label, "reason": e.reason,
                                   "detail": f"{e.detail}; image kept in the unlabeled pool"})
            section, notes = "unlabeled", f"label quarantined: {e.reason}"
    elif task.structures:
        try:
            label_arr = merge_structures(task.structures, task.class_table or {}, img.shape, img.affine)
        except QuarantineError as e:
            return _reject_case(res, task, e, "the structure masks")
        label_path = save_nifti(label_arr, img.affine, out / "nifti" / f"{cid}_label.nii.gz")
        notes = f"merged {len(task.structures)} structure masks"
    if label_arr is not None:
        classes = " ".join(str(int(v)) for v in np.unique(label_arr))
    for path, arr in zip(task.images * len(img.channels) if task.n_channels > 1 else task.images, img.channels,
                         strict=True):
        values = looks_like_label(arr)
        if values is not None:
            res.warnings.append({"path": path, "case_id": cid, "reason": "looks_like_label", "detail": (
                f"integer volume with only {len(values)} distinct values ({' '.join(map(str, values[:8]))}"
                f"{' …' if len(values) > 8 else ''}) ingested as an image: is it a label map?")})
    image_paths = [Path(p) for p in task.images]
    if task.options.get("copy_nifti"):
        names = task.channels if len(image_paths) > 1 else [None]
        image_paths = [_copy(p, out, f"{cid}_{n}" if n else cid) for p, n in zip(image_paths, names, strict=True)]
        if label_path is not None and task.label:
            label_path = _copy(label_path, out, f"{cid}_label")
    rels = [_rel(p, out) for p in image_paths]
    group_id = make_case_id(task.group or f"case:{task.key}", task.salt, prefix="g")
    item: dict = {"image": rels if len(rels) > 1 else rels[0], "case_id": cid, "group_id": group_id}
    if task.channels:
        item["channels"] = list(task.channels)
    if label_path is not None:
        item["label"] = label_rel = _rel(label_path, out)
    res.items.append(item)
    res.rows.append(_row(cid, section, "nifti", ";".join(rels), label_rel, img.channels, img.spacing,
                         orientation_code(img.affine), task.modality, img.dtype,
                         ";".join(sha256_file(p) for p in image_paths), classes, notes, group_id=group_id,
                         channels=";".join(task.channels or [])))
    return res


def _checked_label(path: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    from medssl.data.nifti import load_nifti
    from medssl.data.validation import squeeze_to_3d, validate_label

    lab = load_nifti(path)
    return validate_label(squeeze_to_3d(lab.array, path), lab.affine, shape, affine, path)


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
        group_id = make_case_id(vol.patient_key or f"series:{identity}", task.salt, prefix="g")
        item = {"image": _rel(dst, out), "case_id": cid, "group_id": group_id}
        res.items.append(item)
        res.rows.append(_row(cid, "unlabeled", "dicom", item["image"], "", vol.array, spacing,
                             orientation_code(vol.affine), str(vol.modality or "unknown"), str(vol.array.dtype),
                             sha256_file(dst), notes=notes, group_id=group_id))
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
        # one volume per patient (the MedMNIST splits are per patient): group = case
        item = {"image": _rel(image_abs, out), "class": int(it["class"]), "case_id": it["case_id"],
                "group_id": it["case_id"]}
        res.items.append(item)
        res.rows.append(_row(item["case_id"], section, "medmnist", item["image"], "", array,
                             np.ones(3), "RAS", "MEDMNIST", str(array.dtype), sha256_file(image_abs),
                             klass=str(item["class"])))
    return res
