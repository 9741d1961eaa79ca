"""Pair NIfTI images with the label maps of the *same case*, group channels, find per-structure mask folders.

Rules (names parsed by :mod:`medssl.data.layouts`):

1. **Cases.** Images of one folder with the same key form one case; different channel words (BraTS ``_t1``,
   ``_t1ce``, ``_t2``, ``_flair``) or nnU-Net suffixes (``_0000``, ``_0001``) make it multi-channel. Two files
   for one channel (``a.nii`` + ``a.nii.gz``, or ``a`` + ``a_t1``) → ``ambiguous_image``.
2. **Candidate labels** of a case in folder ``D`` with key ``k``:
   - a label-named file in ``D`` with key ``k``, or a plain label name (``segmentation``, ``mask``…), or any
     label-named file when the image name is plain (KiTS ``imaging`` ↔ ``segmentation``);
   - a file in a label folder ``P/F/sub`` (``labelsTr``, ``labels``, ``masks``…) with key ``k`` when ``D`` is
     ``P/sub`` or ``P/G/sub`` (``imagesTr/x`` ↔ ``labelsTr/x``, BTCV ``img/img0001`` ↔ ``label/label0001``);
     a plain label name there only when ``D`` is ``P/sub`` (the label folder inside the case folder);
   - with ``--labels``: any file there with key ``k``.
3. **Exactly one.** Images and labels linked by candidacy form components: one case + one label is a pair;
   a lone case is unlabeled; a lone label is ``orphan_label``; anything else (two candidate labels for one
   image, one label for two images) quarantines every file of the component as ``ambiguous_label``, with a
   detail naming the other files. Nothing is guessed, no label is used twice.
4. **Per-structure masks.** A label folder holding only files named after structures (``liver``,
   ``spleen``…, no file keyed like the case) inside a case folder with exactly one case is that case's
   ``structures`` (TotalSegmentator ``s0001/ct.nii.gz`` + ``s0001/segmentations/*.nii.gz``); they are merged
   into one label map at ingest (:mod:`medssl.data.structures`).
5. **Channels.** Within one source, when any case has two or more channels, every case must have all
   channels of the source; otherwise ``missing_channel``. Channel order: :func:`layouts.channel_sort_key`.
6. **Groups.** :func:`group_key` (the patient of a case; salted to ``group_id`` at ingest).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medssl.data.layouts import (
    channel_sort_key,
    is_label_dir,
    is_layout_dir,
    nnunet_channels,
    parse_name,
    stem,
)
from medssl.errors import MedsslError

__all__ = ["NiftiCase", "Pairing", "group_key", "pair_nifti", "parse_group_by", "rel_key"]

Quarantine = tuple[str, str, str]  # (path, reason, detail)


@dataclass
class NiftiCase:
    """One case: its image file(s), optional label map or structure masks, and where it goes.

    Attributes:
        images: channel files in channel order (one file for single-channel and 4D multi-channel images).
        label: the label map, if any.
        section: ``"training"`` (labelled) or ``"unlabeled"``.
        key: stable identity of the case (salted to the case id): ``<source folder>/<path of images[0]>``.
        modality: e.g. ``"MRI"`` (from ``dataset.json``), else ``"unknown"``.
        channels: channel names, e.g. ``["t1", "t1ce", "t2", "flair"]``; ``None`` for single-channel cases.
        structures: ``{structure name: mask file}`` to merge into one label map, or ``None``.
        group: unsalted patient key (may hold identifiers: only its salted hash is written).
        n_channels: channels inside one 4D file (MSD multi-modal); 1 otherwise.
        root: the source folder the case was found under.
    """

    images: list[Path]
    label: Path | None
    section: str
    key: str
    modality: str = "unknown"
    channels: list[str] | None = None
    structures: dict[str, Path] | None = None
    group: str = ""
    n_channels: int = 1
    root: Path | None = field(default=None, repr=False)

    @property
    def image(self) -> Path:
        """The first (or only) image file."""
        return self.images[0]


@dataclass
class Pairing:
    cases: list[NiftiCase] = field(default_factory=list)
    quarantine: list[Quarantine] = field(default_factory=list)


def rel_key(path: Path, root: Path) -> str:
    """``<root folder name>/<path relative to root>``: the case identity (two sources stay apart)."""
    base = root if root.is_dir() else root.parent
    try:
        return f"{base.resolve().name}/{path.resolve().relative_to(base.resolve()).as_posix()}"
    except ValueError:
        return path.name


def parse_group_by(value: str) -> str:
    """Check a ``--group-by`` value: ``case`` (default), ``parent``, ``file`` or ``regex:<pattern>``.

    Raises:
        MedsslError: unknown rule or a pattern that does not compile.
    """
    if value in ("case", "parent", "file"):
        return value
    if value.startswith("regex:"):
        try:
            re.compile(value[len("regex:"):])
        except re.error as e:
            raise MedsslError(f"--group-by {value!r}: bad regular expression ({e})") from e
        return value
    raise MedsslError(f"--group-by {value!r}: expected case, parent, file or regex:<pattern>")


def group_key(folder: Path, key: str, first_image: Path, root: Path, rule: str = "case") -> str | None:
    """Unsalted patient key of a case.

    Args:
        folder: the case's image folder.
        key: the case key from the file name (``brats2021_00000``, ``case_000``; ``""`` for plain names).
        first_image: the case's first image file.
        root: the source folder (or file) the case was found under.
        rule: ``case`` — the case folder, unless it is a layout folder (``imagesTr``, ``images``, ``img``…) or
            the source folder itself: then the key from the file name; ``parent`` — the image's folder;
            ``file`` — the key from the file name (the folder when the name is plain); ``regex:<pattern>`` —
            the first group (else the whole match) of the pattern searched in the path relative to the source.

    Returns:
        The key, or ``None`` when a ``regex`` rule does not match (the case is quarantined ``no_group``).
    """
    base = (root if root.is_dir() else root.parent).resolve()
    folder_key = "dir:" + rel_key(folder, base) if folder.resolve() != base else "dir:" + base.name
    if rule.startswith("regex:"):
        try:
            rel = first_image.resolve().relative_to(base).as_posix()
        except ValueError:
            rel = first_image.name
        m = re.search(rule[len("regex:"):], rel)
        if not m:
            return None
        return "re:" + (m.group(1) if m.re.groups else m.group(0))
    if rule == "parent":
        return folder_key
    name_key = f"{folder_key}/{key}" if rule == "case" else key
    if not key:
        return folder_key
    if rule == "file":
        return "file:" + name_key
    layout = folder.resolve() == base or is_layout_dir(folder.name)
    return "name:" + name_key if layout else folder_key


@dataclass
class _Case:
    folder: Path
    key: str
    root: Path
    files: dict[str | None, list[Path]]
    structures: dict[str, Path] | None = None
    channel_names: dict[str, str] | None = None  # nnU-Net index "0000" -> dataset.json name


def _build_cases(images: list[tuple[Path, Path]], label_keys: set[str],
                 channel_names: dict[str, str] | None) -> tuple[list[_Case], list[Quarantine]]:
    by_folder: dict[Path, list[tuple[Path, Path]]] = defaultdict(list)
    for img, root in images:
        by_folder[img.parent].append((img, root))
    cases: list[_Case] = []
    bad: list[Quarantine] = []
    for folder in sorted(by_folder):
        files = by_folder[folder]
        nn = nnunet_channels([stem(f) for f, _ in files], label_keys)
        grouped: dict[str, _Case] = {}
        for f, root in files:
            if nn is not None:
                case_stem, idx = nn[stem(f)]
                key = parse_name(case_stem + ".nii", modality=False).key
                channel: str | None = idx
            else:
                info = parse_name(f)
                key, channel = info.key, info.channel
            case = grouped.setdefault(key, _Case(folder, key, root, defaultdict(list)))
            if nn is not None and channel_names:
                case.channel_names = {f"{int(k):04d}": v for k, v in channel_names.items()}
            case.files[channel].append(f)
        for case in grouped.values():
            all_files = [f for fs in case.files.values() for f in fs]
            dup = any(len(fs) > 1 for fs in case.files.values()) or (None in case.files and len(case.files) > 1)
            if dup:
                names = ", ".join(str(f) for f in sorted(all_files))
                bad += [(str(f), "ambiguous_image", f"several images for one case/channel: {names}")
                        for f in sorted(all_files)]
            else:
                cases.append(case)
    return cases, bad


def _label_dir_split(label: Path, root: Path) -> tuple[Path, tuple[str, ...]] | None:
    """``(P, sub)`` for a label in a label folder ``P/F/sub/file``; ``None`` when it is in no label folder."""
    base = root if root.is_dir() else root.parent
    try:
        parts = label.parent.relative_to(base).parts
    except ValueError:
        return None
    for i, part in enumerate(parts):
        if is_label_dir(part):
            return base.joinpath(*parts[:i]), parts[i + 1:]
    return None


def _find_structures(cases: list[_Case], labels: list[tuple[Path, Path | None]]) -> set[Path]:
    """Mark per-structure mask folders (rule 4); returns the mask files they hold."""
    by_folder = defaultdict(list)
    for c in cases:
        by_folder[c.folder].append(c)
    in_dir: dict[Path, list[Path]] = defaultdict(list)
    for lab, root in labels:
        if root is not None and is_label_dir(lab.parent.name) and lab.parent != root:
            in_dir[lab.parent].append(lab)
    used: set[Path] = set()
    for folder, files in sorted(in_dir.items()):
        owners = by_folder.get(folder.parent, [])
        if len(owners) != 1:
            continue
        case = owners[0]
        keys = {parse_name(f, modality=False).key for f in files}
        siblings = {c.key for c in cases if c.folder.parent == folder.parent and c.folder != folder.parent}
        if "" in keys or case.key in keys or keys & siblings:
            continue
        case.structures = {stem(f): f for f in sorted(files)}
        used.update(files)
    return used


def _candidates(case_idx: dict[Path, list[int]], key_idx: dict[str, list[int]], cases: list[_Case],
                lab: Path, root: Path | None) -> list[int]:
    info = parse_name(lab, modality=False)
    if root is None:  # --labels: match by key anywhere
        return list(key_idx.get(info.key, [])) if info.key else []
    split = _label_dir_split(lab, root)
    if split is None:  # label by name, beside its image
        return [i for i in case_idx.get(lab.parent, [])
                if not info.key or not cases[i].key or cases[i].key == info.key]
    p, sub = split
    out = [i for i in case_idx.get(p.joinpath(*sub), []) if cases[i].key == info.key or not info.key]
    for i in key_idx.get(info.key, []) if info.key else []:
        try:
            rel = cases[i].folder.relative_to(p).parts
        except ValueError:
            continue
        if len(rel) == len(sub) + 1 and rel[1:] == sub and not is_label_dir(rel[0]) and i not in out:
            out.append(i)
    return out


def pair_nifti(images: list[tuple[Path, Path]], labels: list[tuple[Path, Path | None]], *,
               group_by: str = "case", channel_names: dict[str, str] | None = None) -> Pairing:
    """Apply the module rules to NIfTI files found under their source roots.

    Args:
        images: ``(file, source root)`` of every image-like NIfTI.
        labels: ``(file, source root)`` of every label-like NIfTI; root ``None`` for ``--labels`` folders.
        group_by: :func:`group_key` rule.
        channel_names: nnU-Net ``{"0": "T2", "1": "ADC"}`` names for channel suffixes (``dataset.json``).

    Returns:
        Cases (sorted by first image) and quarantine rows ``(path, reason, detail)``.
    """
    label_keys = {parse_name(lab, modality=False).key for lab, _ in labels}
    raw, bad = _build_cases(images, label_keys, channel_names)
    structure_files = _find_structures(raw, labels)
    case_idx: dict[Path, list[int]] = defaultdict(list)
    key_idx: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(raw):
        case_idx[c.folder].append(i)
        key_idx[c.key].append(i)
    label_list = [(lab, root) for lab, root in labels if lab not in structure_files]
    case_labels: dict[int, list[int]] = defaultdict(list)
    label_cases: dict[int, list[int]] = {}
    for j, (lab, root) in enumerate(label_list):
        label_cases[j] = _candidates(case_idx, key_idx, raw, lab, root)
        for i in label_cases[j]:
            case_labels[i].append(j)
    out = Pairing(quarantine=bad)
    done: set[int] = set()
    for j, cands in label_cases.items():
        if not cands:
            out.quarantine.append((str(label_list[j][0]), "orphan_label", "label map with no image of the same case"))
    component = _components(len(raw), case_labels, label_cases)
    for members_c, members_l in component:
        names_c = [str(f) for i in members_c for f in _files(raw[i])]
        names_l = [str(label_list[j][0]) for j in members_l]
        n_labels = len(members_l) + sum(1 for i in members_c if raw[i].structures)
        if len(members_c) == 1 and n_labels <= 1:
            continue
        detail = (f"{len(members_c)} image case(s) and {n_labels} label candidate(s) match each other: "
                  + ", ".join(names_c + names_l + [str(raw[i].folder / "<structures>") for i in members_c
                                                   if raw[i].structures]))
        out.quarantine += [(name, "ambiguous_label", detail) for name in names_c + names_l]
        done.update(members_c)
    for i, c in enumerate(raw):
        if i in done:
            continue
        labs = case_labels.get(i, [])
        label = label_list[labs[0]][0].resolve() if labs else None
        _append_case(out, c, label, group_by)
    _check_channels(out)
    out.cases.sort(key=lambda c: str(c.images[0]))
    return out


def _files(c: _Case) -> list[Path]:
    return [f for fs in c.files.values() for f in fs]


def _components(n_cases: int, case_labels: dict[int, list[int]],
                label_cases: dict[int, list[int]]) -> list[tuple[list[int], list[int]]]:
    """Connected components of the case–label candidacy graph that contain at least one case."""
    seen_c: set[int] = set()
    comps = []
    for start in range(n_cases):
        if start in seen_c:
            continue
        stack, cs, ls = [start], {start}, set()
        while stack:
            i = stack.pop()
            for j in case_labels.get(i, []):
                if j not in ls:
                    ls.add(j)
                    for k in label_cases[j]:
                        if k not in cs:
                            cs.add(k)
                            stack.append(k)
        seen_c |= cs
        comps.append((sorted(cs), sorted(ls)))
    return comps


def _append_case(out: Pairing, c: _Case, label: Path | None, group_by: str) -> None:
    channels = sorted(c.files, key=lambda ch: channel_sort_key(ch or ""))
    images = [c.files[ch][0].resolve() for ch in channels]
    group = group_key(c.folder, c.key, c.files[channels[0]][0], c.root, group_by)
    if group is None:
        out.quarantine += [(str(f), "no_group", f"--group-by {group_by} does not match its path") for f in images]
        return
    out.cases.append(NiftiCase(
        images=images, label=label, section="training" if label or c.structures else "unlabeled",
        key=rel_key(c.files[channels[0]][0], c.root),
        channels=None if channels == [None] else [(c.channel_names or {}).get(str(ch), str(ch)) for ch in channels],
        structures={k: v.resolve() for k, v in c.structures.items()} if c.structures else None, group=group,
        root=c.root))


def _check_channels(out: Pairing) -> None:
    """Rule 5: within one source every case has all channels some case has; single channels are dropped."""
    by_root: dict[Path | None, list[NiftiCase]] = defaultdict(list)
    for case in out.cases:
        by_root[case.root].append(case)
    keep: list[NiftiCase] = []
    for cases in by_root.values():
        if max(len(c.channels or []) for c in cases) < 2:
            for c in cases:
                c.channels = None
            keep += cases
            continue
        expected = sorted({ch for c in cases for ch in c.channels or []}, key=channel_sort_key)
        for c in cases:
            missing = [ch for ch in expected if ch not in (c.channels or [])]
            if not missing:
                keep.append(c)
                continue
            detail = (f"case {c.key} lacks channel(s) {', '.join(missing)} that other cases of its source have "
                      f"({', '.join(expected)})")
            out.quarantine += [(str(f), "missing_channel", detail) for f in c.images]
            if c.label:
                out.quarantine.append((str(c.label), "image_quarantined", f"its case was quarantined "
                                       f"(missing_channel {', '.join(missing)})"))
    out.cases = keep
