"""Leakage check between SSL pretraining and finetuning: the encoder must never have seen a case that
finetuning selects checkpoints on (validation) or reports (test).

A pretraining checkpoint's recipe records the pool it was trained on (``recipe["pool"]``, written by
:class:`medssl.engines.pretrain.engine.Pretrainer`)::

    "pool": {"case_ids": ["c0a1...", ...],      # sorted case ids of every pretraining volume
             "fingerprint": "3f9c0e7d1a2b4c5d",  # medssl.engines.pretrain.pool.pool_fingerprint of the pool
             "splits_sha256": "ab12..." | None,  # sha256 of the splits.json the pool came from
             "source": "pretrain_pool" | "unlabeled[1]" | "sections"}

Finetuning with an SSL init calls :func:`check_pretrain_leakage` with its validation and test case ids. The
study-wide pool of ``splits.json`` (``pretrain_pool``, the default of ``medssl pretrain --splits``) passes
for every seed; a per-seed pool (``split_seed``) or a pool made before seeds were added does not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from medssl.errors import MedsslError

__all__ = ["check_pretrain_leakage", "pretrained_case_ids"]

log = logging.getLogger(__name__)


def pretrained_case_ids(recipe: Mapping[str, Any] | None) -> set[str] | None:
    """The case ids the encoder of ``recipe`` was pretrained on, or ``None`` when the recipe records no pool
    (an external encoder, or a checkpoint written before pools were recorded)."""
    pool = (recipe or {}).get("pool")
    if not isinstance(pool, Mapping) or not isinstance(pool.get("case_ids"), list):
        return None
    return {str(c) for c in pool["case_ids"]}


def check_pretrain_leakage(recipe: Mapping[str, Any] | None, validation_ids: Iterable[str],
                           test_ids: Iterable[str], *, source: str) -> None:
    """Refuse an SSL encoder that was pretrained on validation or test cases of this finetuning run.

    Args:
        recipe: the SSL checkpoint's recipe (``encoder.pt["recipe"]``, ``SSLCheckpoint.recipe``).
        validation_ids: case ids of the run's validation set.
        test_ids: case ids of the run's test set.
        source: the checkpoint path / URI, named in messages.

    Raises:
        MedsslError: naming the checkpoint, how many validation and test cases the encoder saw and up to 3
            of each, e.g. ``runs/pretrain/encoder.pt: the SSL encoder was pretrained on 4 validation case(s)
            (c01, c07, c09, …) of this run …``. A recipe without a pool only logs a warning.
    """
    seen = pretrained_case_ids(recipe)
    if seen is None:
        log.warning("%s records no pretraining pool (external or older checkpoint): cannot check that the "
                    "encoder never saw this run's validation/test cases", source)
        return
    hits = {role: sorted(seen.intersection(map(str, ids)))
            for role, ids in (("validation", validation_ids), ("test", test_ids))}
    if not any(hits.values()):
        log.info("%s: pretraining pool (%d cases) is disjoint from this run's validation and test sets", source,
                 len(seen))
        return
    named = [f"{len(ids)} {role} case(s) ({', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"
             for role, ids in hits.items() if ids]
    raise MedsslError(
        f"{source}: the SSL encoder was pretrained on {' and '.join(named)} of this run, so checkpoint "
        "selection and test numbers would be biased. Pretrain on the study-wide pool (splits.json "
        "'pretrain_pool', the default of `medssl pretrain --splits` since splits version 2); seeds added to a "
        "study after its pretraining: `medssl sweep … --new` pretrains again on the current pool"
    )
