"""Find ingestible inputs among files and folders and pair images with label maps.

Recognised inputs:
- MSD layout: a ``dataset.json`` (or a folder holding one) with ``training`` ``{image, label}`` pairs and ``test``
  images (the latter become unlabeled).
- NIfTI files (``.nii``/``.nii.gz``). A file is a *label map* when one of its folders is named like
  ``labelsTr``/``labels``/``segmentations``/``masks`` or its name ends in ``_seg``/``_label``/``_mask``/``_gt``;
  otherwise it is an image. Labels pair with images by name key (``case_01_seg.nii.gz`` ↔ ``case_01.nii.gz``,
  ``labelsTr/x.nii.gz`` ↔ ``imagesTr/x.nii.gz``; MSD channel suffix ``_0000`` ignored), preferring the closest
  folder when a key repeats.
- MedMNIST ``.npz`` files.
- Anything else (extension or not) is a DICOM candidate; `medssl.data.dicom` decides.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medssl.errors import MedsslError

__all__ = ["NiftiCase", "Discovery", "discover", "name_key", "is_nifti"]

LABEL_DIRS = {"labelstr", "labelsts", "labels", "label", "segmentations", "segmentation", "masks", "mask", "seg"}
LABEL_SUFFIX = re.compile(r"([_-](seg|segmentation|label|labels|mask|gt))$", re.IGNORECASE)
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
# Extensions that are certainly not DICOM; skipped quietly (DICOM files may have any or no extension).
NOT_DICOM = {
    ".json", ".txt", ".md", ".csv", ".tsv", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".xml", ".html", ".py",
    ".yaml", ".yml", ".zip", ".gz", ".tar", ".bz2", ".xz", ".npy", ".mha", ".mhd", ".nrrd", ".log", ".ini",
}


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def name_key(path: Path) -> str:
    """Pairing key of an image or label file: the stem without label/channel suffixes, lower-cased."""
    stem = LABEL_SUFFIX.sub("", _stem(path))
    return CHANNEL_SUFFIX.sub("", stem).lower()


def _is_label_path(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        parts = path.parts[:-1]
    if any(p.lower() in LABEL_DIRS for p in parts):
        return True
    return bool(LABEL_SUFFIX.search(_stem(path)))


@dataclass
class NiftiCase:
    """One NIfTI image, its optional label map and the datalist section it is meant for."""

    image: Path
    label: Path | None
    section: str  # "training" (labelled) or "unlabeled"
    key: str  # stable identity used (salted) for the case id: path relative to its source root
    modality: str = "unknown"


@dataclass
class Discovery:
    nifti: list[NiftiCase] = field(default_factory=list)
    dicom_candidates: list[Path] = field(default_factory=list)
    npz: list[Path] = field(default_factory=list)
    orphan_labels: list[Path] = field(default_factory=list)


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                out.append(Path(dirpath) / f)
    return out


def _rel_key(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        # the source folder's own name keeps two sources with the same inner layout apart
        return f"{base.resolve().name}/{path.resolve().relative_to(base.resolve()).as_posix()}"
    except ValueError:
        return path.name


def _msd(dataset_json: Path) -> list[NiftiCase]:
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{dataset_json}: not a readable MSD dataset.json ({e})") from e
    base = dataset_json.parent
    mods = meta.get("modality") or {}
    modality = str(next(iter(mods.values()))) if isinstance(mods, dict) and len(mods) == 1 else "unknown"
    cases: list[NiftiCase] = []
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise MedsslError(f"{dataset_json}: 'training' entries must be objects with an 'image' key")
        img = (base / entry["image"]).resolve()
        lab = (base / entry["label"]).resolve() if entry.get("label") else None
        cases.append(NiftiCase(img, lab, "training" if lab else "unlabeled", _rel_key(img, base), modality))
    for entry in meta.get("test", []):
        path = entry if isinstance(entry, str) else entry.get("image")
        if path:
            img = (base / path).resolve()
            cases.append(NiftiCase(img, None, "unlabeled", _rel_key(img, base), modality))
    return cases


def _pair(images: list[tuple[Path, Path]], labels: list[Path]) -> tuple[list[NiftiCase], list[Path]]:
    by_key: dict[str, list[Path]] = {}
    for lab in labels:
        by_key.setdefault(name_key(lab), []).append(lab)
    used: set[Path] = set()
    cases: list[NiftiCase] = []
    for img, root in images:
        cands = by_key.get(name_key(img), [])
        label = None
        if cands:
            # the label sharing the longest folder prefix with the image wins
            label = max(cands, key=lambda c: len(os.path.commonpath([str(c.parent), str(img.parent)])))
            used.add(label)
        cases.append(NiftiCase(img.resolve(), label.resolve() if label else None,
                               "training" if label else "unlabeled", _rel_key(img, root)))
    orphans = [lab for lab in labels if lab not in used]
    return cases, orphans


def discover(sources: list[Path], labels: list[Path] | None = None) -> Discovery:
    """Classify every file under ``sources`` (and label folders ``labels``) into ingestible groups.

    Raises:
        MedsslError: a source does not exist.
    """
    found = Discovery()
    images: list[tuple[Path, Path]] = []
    label_files: list[Path] = []
    for src in sources:
        src = Path(src)
        if not src.exists():
            raise MedsslError(f"{src}: no such file or folder")
        if src.is_file() and src.name == "dataset.json":
            found.nifti.extend(_msd(src))
            continue
        if src.is_dir() and (src / "dataset.json").is_file():
            found.nifti.extend(_msd(src / "dataset.json"))
            continue
        files = [src] if src.is_file() else _walk(src)
        for f in files:
            low = f.name.lower()
            if is_nifti(f):
                (label_files.append(f) if _is_label_path(f, src) else images.append((f, src)))
            elif low.endswith(".npz"):
                found.npz.append(f)
            elif f.suffix.lower() in NOT_DICOM or low == "dicomdir":
                continue
            else:
                found.dicom_candidates.append(f)
    for lab_src in labels or []:
        lab_src = Path(lab_src)
        if not lab_src.exists():
            raise MedsslError(f"{lab_src}: no such labels file or folder")
        label_files.extend(f for f in ([lab_src] if lab_src.is_file() else _walk(lab_src)) if is_nifti(f))
    cases, orphans = _pair(images, label_files)
    found.nifti.extend(cases)
    found.orphan_labels = orphans
    return found
