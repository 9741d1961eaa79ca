"""Find ingestible inputs among files and folders and pair images with label maps.

Recognised inputs:
- MSD / nnU-Net v1 layout: a ``dataset.json`` (or a folder holding one) with ``training`` ``{image, label}``
  pairs and ``test`` images (the latter become unlabeled). A listed image that does not exist but has nnU-Net
  channel files (``case_000_0000.nii.gz`` …) becomes a multi-channel case; with several ``modality`` entries a
  listed 4D file is one multi-channel image. A label listed for two images is ``ambiguous_label``.
- nnU-Net v2 layout: a ``dataset.json`` without ``training`` (``channel_names``, ``labels``): the folder is
  walked and paired like any other, channel suffixes named by ``channel_names``.
- NIfTI files (``.nii``/``.nii.gz``), paired by :mod:`medssl.data.pairing` (same case only, a label used once,
  ambiguity quarantined, per-structure mask folders, multi-channel cases).
- MedMNIST ``.npz`` files.
- Anything else (extension or not) is a DICOM candidate; `medssl.data.dicom` decides.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medssl.data.layouts import is_label_dir, is_label_name, is_nifti, parse_name
from medssl.data.pairing import NiftiCase, group_key, pair_nifti, rel_key
from medssl.errors import MedsslError

__all__ = ["NiftiCase", "Discovery", "discover", "name_key", "is_nifti"]

# Extensions that are certainly not DICOM; skipped quietly (DICOM files may have any or no extension).
NOT_DICOM = {
    ".json", ".txt", ".md", ".csv", ".tsv", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".xml", ".html", ".py",
    ".yaml", ".yml", ".zip", ".gz", ".tar", ".bz2", ".xz", ".npy", ".mha", ".mhd", ".nrrd", ".log", ".ini",
}


def name_key(path: Path) -> str:
    """Pairing key of an image or label file (see :func:`medssl.data.layouts.parse_name`)."""
    return parse_name(path).key


@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes:
        nifti: the NIfTI cases to ingest.
        dicom_candidates: files that may be DICOM.
        npz: MedMNIST files.
        quarantine: ``(path, reason, detail)`` of NIfTI files rejected by pairing (``orphan_label``,
            ``ambiguous_label``, ``ambiguous_image``, ``missing_channel``, ``no_group``).
        label_names: class table ``{"0": "background", "1": …}`` from ``dataset.json`` files (when they agree).
    """

    nifti: list[NiftiCase] = field(default_factory=list)
    dicom_candidates: list[Path] = field(default_factory=list)
    npz: list[Path] = field(default_factory=list)
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)
    label_names: dict[str, str] | None = None

    @property
    def orphan_labels(self) -> list[Path]:
        """Label maps with no image of the same case."""
        return [Path(p) for p, reason, _ in self.quarantine if reason == "orphan_label"]


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                out.append(Path(dirpath) / f)
    return out


def _label_table(meta: dict) -> dict[str, str] | None:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0}`` → ``{"0": "background", …}``."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    if all(str(k).isdigit() for k in labels):
        return {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    if all(isinstance(v, int) for v in labels.values()):
        return {str(v): str(k) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
    return None


def _channel_files(img: Path, n: int) -> list[Path] | None:
    """nnU-Net v1: ``imagesTr/case_000.nii.gz`` listed, ``case_000_0000.nii.gz`` … on disk."""
    ext = ".nii.gz" if img.name.endswith(".nii.gz") else ".nii"
    base = img.name[: -len(ext)]
    files = [img.with_name(f"{base}_{i:04d}{ext}") for i in range(max(n, 1))]
    return files if all(f.is_file() for f in files) else None


def _msd(dataset_json: Path, group_by: str, found: Discovery) -> dict | None:
    """Cases of an MSD / nnU-Net v1 ``dataset.json``; returns the nnU-Net v2 metadata instead (no list)."""
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{dataset_json}: not a readable MSD dataset.json ({e})") from e
    if not isinstance(meta, dict):
        raise MedsslError(f"{dataset_json}: not a readable MSD dataset.json (not an object)")
    table = _label_table(meta)
    if table:
        found.label_names = table if found.label_names in (None, table) else {}
    if "training" not in meta and isinstance(meta.get("channel_names"), dict):
        return meta
    base = dataset_json.parent
    mods = meta.get("modality") or {}
    names = [str(v) for _, v in sorted(mods.items(), key=lambda kv: int(kv[0]))] if isinstance(mods, dict) else []
    modality = names[0] if len(names) == 1 else "unknown"
    entries: list[tuple[Path, Path | None]] = []
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise MedsslError(f"{dataset_json}: 'training' entries must be objects with an 'image' key")
        entries.append(((base / entry["image"]).resolve(),
                        (base / entry["label"]).resolve() if entry.get("label") else None))
    for entry in meta.get("test", []):
        path = entry if isinstance(entry, str) else entry.get("image")
        if path:
            entries.append(((base / path).resolve(), None))
    reused = Counter(lab for _, lab in entries if lab is not None)
    for img, lab in entries:
        if lab is not None and reused[lab] > 1:
            others = ", ".join(str(i) for i, x in entries if x == lab)
            detail = f"{dataset_json.name} lists label {lab} for {reused[lab]} images: {others}"
            found.quarantine += [(str(img), "ambiguous_label", detail), (str(lab), "ambiguous_label", detail)]
            continue
        files = [img] if img.is_file() else _channel_files(img, len(names)) or [img]
        channels = names if len(names) > 1 else None
        group = group_key(img.parent, parse_name(img).key, img, base, group_by)
        if group is None:
            found.quarantine.append((str(img), "no_group", f"--group-by {group_by} does not match its path"))
            continue
        found.nifti.append(NiftiCase(
            images=files, label=lab, section="training" if lab else "unlabeled", key=rel_key(img, base),
            modality=modality, channels=channels, group=group, root=base,
            n_channels=len(names) if len(files) == 1 and len(names) > 1 else 1))
    return None


def _is_label_path(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        parts = path.parts[:-1]
    return any(is_label_dir(p) for p in parts) or is_label_name(path)


def discover(sources: list[Path], labels: list[Path] | None = None, *, group_by: str = "case") -> Discovery:
    """Classify every file under ``sources`` (and label folders ``labels``) into ingestible groups.

    Args:
        sources: files and folders to ingest.
        labels: extra folders/files of label maps, paired with images by key (``--labels``).
        group_by: how NIfTI cases are grouped into patients (:func:`medssl.data.pairing.group_key`).

    Raises:
        MedsslError: a source does not exist, or a ``dataset.json`` is unreadable.
    """
    found = Discovery()
    images: list[tuple[Path, Path]] = []
    label_files: list[tuple[Path, Path | None]] = []
    channel_names: dict[str, str] | None = None
    for src in sources:
        src = Path(src)
        if not src.exists():
            raise MedsslError(f"{src}: no such file or folder")
        ds_json = src if src.is_file() and src.name == "dataset.json" else src / "dataset.json"
        if ds_json.is_file():
            v2 = _msd(ds_json, group_by, found)
            if v2 is None:
                continue
            channel_names = {str(k): str(v) for k, v in v2["channel_names"].items()}
            if len(channel_names) == 1:
                channel_names = None
            src = ds_json.parent
        files = [src] if src.is_file() else _walk(src)
        for f in files:
            low = f.name.lower()
            if is_nifti(f):
                if _is_label_path(f, src):
                    label_files.append((f, src))
                else:
                    images.append((f, src))
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
        label_files.extend((f, None) for f in ([lab_src] if lab_src.is_file() else _walk(lab_src)) if is_nifti(f))
    pairing = pair_nifti(images, label_files, group_by=group_by, channel_names=channel_names)
    found.nifti.extend(pairing.cases)
    found.quarantine.extend(pairing.quarantine)
    if found.label_names == {}:
        found.label_names = None
    return found
