"""Bidirectional copy-paste of truly labelled and pseudo-labelled volumes within a training batch, for
self-training students (:mod:`medssl.engines.finetune.pseudo`).

Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation", CVPR 2023 (BCP): a box of
a labelled volume is pasted into an unlabeled one and the same box of the unlabeled volume into the labelled one,
with labels mixed the same way (true labels inside/outside the box, the teacher's labels elsewhere), so that the
network sees the labelled and unlabeled distributions in one image and the teacher's errors are diluted by true
labels in every mixed volume. Here the unlabeled side carries the offline teacher's pseudo-labels (BCP's own
teacher is an EMA of the student); the box is a cuboid of ``box`` × each spatial size (BCP: 2/3) at a uniformly
random position.

Pairs are drawn within a batch: the truly labelled items (``case_id`` without the ``pseudo:`` prefix) and the
pseudo-labelled ones are each shuffled and paired in order (``min(#true, #pseudo)`` pairs; a batch of one kind is
left as it is), and each pair is mixed with probability ``prob``. All draws come from a ``torch.Generator``
seeded with the run's seed and the optimizer step, so a resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medssl.engines.finetune.pseudo import PSEUDO_PREFIX

__all__ = ["copy_paste_pairs", "bidirectional_copy_paste", "mix_generator"]


def mix_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one optimizer step's mixing draws (CPU; a function of ``(seed, step)`` only)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return g


def copy_paste_pairs(case_ids: Sequence[str], prob: float, generator: torch.Generator) -> list[tuple[int, int]]:
    """``(true index, pseudo index)`` pairs of a batch to mix (see the module docstring).

    Example: ``["a", "pseudo:b", "c", "pseudo:d"]`` with ``prob=1`` → two pairs, e.g. ``[(2, 1), (0, 3)]``.
    """
    true = [i for i, c in enumerate(case_ids) if not str(c).startswith(PSEUDO_PREFIX)]
    pseudo = [i for i, c in enumerate(case_ids) if str(c).startswith(PSEUDO_PREFIX)]
    t = [true[int(k)] for k in torch.randperm(len(true), generator=generator)]
    p = [pseudo[int(k)] for k in torch.randperm(len(pseudo), generator=generator)]
    keep = torch.rand(min(len(t), len(p)), generator=generator) < prob
    return [(a, b) for (a, b), k in zip(zip(t, p, strict=False), keep.tolist(), strict=True) if k]


def _box(shape: Sequence[int], box: float, generator: torch.Generator) -> tuple[slice, ...]:
    sizes = [max(1, round(box * n)) for n in shape]
    starts = [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(shape, sizes, strict=True)]
    return tuple(slice(a, a + s) for a, s in zip(starts, sizes, strict=True))


def bidirectional_copy_paste(
    image: torch.Tensor, label: torch.Tensor, pairs: Sequence[tuple[int, int]], generator: torch.Generator,
    box: float = 2.0 / 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each pair ``(a, b)``: one random box (``box`` × every spatial size) is swapped between items ``a`` and
    ``b`` of ``image (B, C, D, H, W)`` and ``label (B, 1, D, H, W)``; new tensors, the inputs are not changed.

    Raises:
        ValueError: ``box`` outside (0, 1], or image and label of different batch or spatial sizes.
    """
    if not 0.0 < box <= 1.0:
        raise ValueError(f"copy-paste box must be in (0, 1], got {box!r}")
    if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in batch or spatial size")
    if not pairs:
        return image, label
    image, label = image.clone(), label.clone()
    for a, b in pairs:
        region = (slice(None), *_box(image.shape[2:], box, generator))
        for t in (image, label):
            ta, tb = t[a][region].clone(), t[b][region].clone()
            t[a][region], t[b][region] = tb, ta
    return image, label
