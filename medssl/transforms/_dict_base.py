"""Shared ``__call__`` skeleton of medssl's random dictionary transforms (masking, Models Genesis).

As in MONAI's ``…d`` transforms, a transform draws its random parameters **once** per call from its own
``self.R`` (``randomize``; ``set_random_state(seed)`` comes from ``RandomizableTransform``) and applies
them to every key, so image, label and mask stay aligned.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = ["RandDictTransform", "as_batch"]


def as_batch(img: Any) -> torch.Tensor:
    """``(C, D, H, W)`` MetaTensor / tensor / array → plain tensor ``(1, C, D, H, W)`` (a view, no copy)."""
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return t[None]


class RandDictTransform(RandomizableTransform, MapTransform):
    """Base of the random dict transforms that apply one draw to every key.

    ``__call__`` copies the dict; draws with ``randomize(first)`` (``first``: the image ``(C, D, H, W)``
    of the first key present); if the transform fires, builds ``state = _prepare(first)`` once and
    replaces every key's image ``x`` by ``_apply(x[None], state)[0]``, converted back to the key's type
    (MetaTensor, tensor or array); then calls ``_finish(d, state, first)`` (``state`` is ``None`` when it
    did not fire) whether or not it fired. A dict without any of the keys is returned unchanged.

    A subclass whose draw ignores the image sets ``draw_before_keys = True``: it calls ``randomize(None)``
    before looking at the keys (MONAI's ``RandScaleIntensityd`` order) and, when it does not fire,
    returns the dict without touching the keys (nor calling ``_finish``).

    Args:
        keys: keys of the images ``(C, D, H, W)`` to transform.
        prob: probability that a call applies the transform.
        allow_missing_keys: skip absent keys instead of raising ``KeyError``.
    """

    draw_before_keys: ClassVar[bool] = False

    def __init__(self, keys: KeysCollection, prob: float, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.draw_before_keys:
            self.randomize(None)
            if not self._do_transform:
                return d
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        first = d[keys[0]]
        if not self.draw_before_keys:
            self.randomize(first)
        state = None
        if self._do_transform:
            state = self._prepare(first)
            for key in keys:
                img = d[key]
                d[key] = convert_to_dst_type(self._apply(as_batch(img), state)[0], img)[0]
        self._finish(d, state, first)
        return d

    def _prepare(self, first: Any) -> Any:
        """Per-call state shared by all keys (a mask, a look-up table), once the draw fired."""
        return None

    def _apply(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """Transform one key's image ``x`` ``(1, C, D, H, W)`` with the call's ``state``."""
        raise NotImplementedError

    def _finish(self, d: dict[Hashable, Any], state: Any, first: Any) -> None:
        """Last step of every call with a key present (e.g. write the mask key); nothing by default."""
