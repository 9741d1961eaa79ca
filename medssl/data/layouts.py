"""File-name and folder vocabulary of public and hospital NIfTI layouts: which file is a label, which part of
a name is the case, which part is a channel.

A name is cut into *tokens* at ``_``, ``-``, ``.`` and spaces (``BraTS2021_00000_t1ce`` → ``BraTS2021``,
``00000``, ``t1ce``). Then:

- a token equal to a *label word* (:data:`LABEL_WORDS`: seg, segmentation, mask, label, gt, annotation, …) or
  such a word followed by digits (BTCV ``label0001``) marks a label map; the word is dropped from the key;
- a token equal to an *image word* (:data:`IMAGE_WORDS`: image, img, imaging, volume, scan) or such a word
  followed by digits (BTCV ``img0001``, LiTS ``volume-0``) is dropped from the key;
- a last token in :data:`MODALITY_WORDS` (BraTS ``t1``, ``t1ce``, ``t2``, ``flair``; ``ct``, ``pet``, ``adc``…)
  names a channel and is dropped from the key.

The *key* is the remaining tokens joined by ``_``, lower-cased: KiTS ``imaging`` and ``segmentation`` both
have the empty key ``""`` (a "plain" name that pairs with any file of its folder), LiTS ``volume-0`` and
``segmentation-0`` have ``"0"``, BTCV ``img0001`` / ``label0001`` have ``"0001"``, BraTS
``BraTS2021_00000_t1`` has ``"brats2021_00000"`` and channel ``"t1"``. nnU-Net channel suffixes (``_0000``)
are folder-level decisions (:func:`nnunet_channels`): AMOS ``amos_0001`` is a case, not channel 1.

A *label folder* (:func:`is_label_dir`): ``labelsTr``, ``labels*``, ``masks*``, ``label``, ``segmentations``,
``seg``, ``gt``, ``annotations``…; a *layout folder* (:func:`is_layout_dir`) holds the images of many cases
(``imagesTr``, ``images*``, ``img``, ``volumes``), so it is no case folder for ``group_id``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHANNEL_ORDER",
    "IMAGE_WORDS",
    "LABEL_WORDS",
    "MODALITY_WORDS",
    "NameInfo",
    "channel_sort_key",
    "is_label_dir",
    "is_label_name",
    "is_layout_dir",
    "is_nifti",
    "nnunet_channels",
    "parse_name",
    "stem",
]

LABEL_WORDS = frozenset({"seg", "segs", "segmentation", "segmentations", "mask", "masks", "label", "labels", "gt",
                         "annotation", "annotations", "groundtruth"})
IMAGE_WORDS = frozenset({"image", "images", "img", "imaging", "volume", "vol", "scan"})
#: channel order: BraTS 2021 (t1, t1ce, t2, flair) and 2023 (t1n, t1c, t2w, t2f) first, the rest sorted
CHANNEL_ORDER = ("t1", "t1n", "t1w", "t1ce", "t1c", "t1gd", "t2", "t2w", "flair", "t2f")
MODALITY_WORDS = frozenset(CHANNEL_ORDER) | {"pd", "pdw", "adc", "dwi", "ct", "pet", "swi", "dce"}
_LABEL_DIRS = frozenset({"labelstr", "labelsts", "labels", "label", "segmentations", "segmentation", "masks",
                         "mask", "seg", "segs", "gt", "annotations", "groundtruth", "ground_truth"})
_LABEL_DIR_PREFIX = re.compile(r"^(labels|masks)[\w-]*$", re.IGNORECASE)
_LAYOUT_DIRS = frozenset({"imagestr", "imagests", "imagesva", "images", "image", "img", "imgs", "volumes", "scans"})
_LAYOUT_DIR_PREFIX = re.compile(r"^images[\w-]*$", re.IGNORECASE)
_SPLIT = re.compile(r"[_\-. ]+")
_WORD_DIGITS = re.compile(r"^([a-z]+)(\d+)$")
_NNUNET = re.compile(r"^(.*)_(\d{4})$")


def is_nifti(path: Path) -> bool:
    """``.nii`` or ``.nii.gz`` (any case)."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def stem(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz``: ``case_01_seg.nii.gz`` → ``case_01_seg``."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_label_dir(name: str) -> bool:
    """Whether a folder name marks its files as label maps (``labelsTr``, ``masks_v2``, ``segmentations``…)."""
    return name.lower() in _LABEL_DIRS or bool(_LABEL_DIR_PREFIX.match(name))


def is_layout_dir(name: str) -> bool:
    """Whether a folder holds the images of many cases (``imagesTr``, ``images``, ``img``…)."""
    return name.lower() in _LAYOUT_DIRS or bool(_LAYOUT_DIR_PREFIX.match(name))


def _word_of(token: str, words: frozenset[str]) -> str | None:
    """``token`` itself, or the digits after a leading word (``label0001`` → ``"0001"``), when it is a word."""
    if token in words:
        return ""
    m = _WORD_DIGITS.match(token)
    if m and m.group(1) in words:
        return m.group(2)
    return None


@dataclass(frozen=True)
class NameInfo:
    """What a file name says.

    Attributes:
        key: case key, lower-case (``""`` for plain names such as ``imaging``, ``mask``).
        label_word: the name holds a label word (``_seg``, ``mask``, ``label0001``…).
        channel: modality word of the last token (``"t1ce"``), ``None`` when there is none.
    """

    key: str
    label_word: bool
    channel: str | None


def parse_name(path: Path | str, *, modality: bool = True) -> NameInfo:
    """Parse a NIfTI file name (see the module docstring).

    Args:
        path: the file (only its name is read).
        modality: read a trailing modality word as a channel (off for label maps).

    Returns:
        The :class:`NameInfo`; e.g. ``BraTS2021_00000_t1ce.nii.gz`` → key ``"brats2021_00000"``, channel
        ``"t1ce"``; ``segmentation-12.nii`` → key ``"12"``, label word.
    """
    tokens = [t for t in _SPLIT.split(stem(Path(path)).lower()) if t]
    channel = None
    if modality and len(tokens) >= 1 and tokens[-1] in MODALITY_WORDS:
        channel = tokens.pop()
    kept: list[str] = []
    label_word = False
    for tok in tokens:
        lab = _word_of(tok, LABEL_WORDS)
        if lab is not None:
            label_word = True
            kept += [lab] if lab else []
            continue
        img = _word_of(tok, IMAGE_WORDS)
        kept += ([img] if img else []) if img is not None else [tok]
    return NameInfo(key="_".join(kept), label_word=label_word, channel=channel)


def is_label_name(path: Path | str) -> bool:
    """Whether the file name alone marks a label map (``a_seg``, ``mask``, ``segmentation-0``, ``label0001``)."""
    return parse_name(path, modality=False).label_word


def channel_sort_key(name: str) -> tuple[int, str]:
    """Sort key of a channel name: BraTS order first (t1, t1ce, t2, flair), then sorted (``0000`` < ``0001``)."""
    return (CHANNEL_ORDER.index(name), "") if name in CHANNEL_ORDER else (len(CHANNEL_ORDER), name)


def nnunet_channels(stems: list[str], label_keys: set[str]) -> dict[str, tuple[str, str]] | None:
    """Decide whether the images of one folder carry nnU-Net channel suffixes (``case_000_0000``).

    They do when every stem ends in ``_NNNN``, every case has exactly the suffixes ``0000 … C-1`` (the same
    ``C`` for all cases) and no label of the folder's scope is named by a full stem. AMOS ``amos_0001``,
    ``amos_0002`` … therefore stay cases (no ``_0000``; their labels carry the full stem).

    Args:
        stems: file stems of the folder's images.
        label_keys: keys of the labels that may pair with this folder.

    Returns:
        ``{stem: (case stem, "0000")}`` for every stem, or ``None`` when the folder is not channel-suffixed.
    """
    if not stems:
        return None
    parts = {s: _NNUNET.match(s) for s in stems}
    if not all(parts.values()):
        return None
    cases: dict[str, set[str]] = {}
    for m in parts.values():
        cases.setdefault(m.group(1), set()).add(m.group(2))  # type: ignore[union-attr]
    sizes = {len(v) for v in cases.values()}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    if any(v != {f"{i:04d}" for i in range(n)} for v in cases.values()):
        return None
    if any(parse_name(s + ".nii", modality=False).key in label_keys for s in stems):
        return None
    return {s: (m.group(1), m.group(2)) for s, m in parts.items()}  # type: ignore[union-attr]
