"""Patient groups for :mod:`medssl.data.splits`: which cases belong together and how whole groups are drawn.

A *group* is the set of datalist items sharing ``item["group_id"]`` (``medssl ingest`` writes a salted hash of
the DICOM PatientID, or of the NIfTI ``--group-by`` rule); an item without one is its own group
(``group_id = case_id``, what datalists made before grouping existed get). Splits never cut a group: every
group lies wholly inside the test set, one seed's validation set or that seed's training set, and its
unlabelled items leave the pretraining pool when any of its items is held out.

Sizes stay counted in *cases*: a draw takes whole groups in hash order until its case target is reached or
exceeded (:func:`take_groups`), so a set overshoots its target by less than one group. With singleton groups
this is exactly the case-level draw of splits made before grouping.

Worked example: groups ``a`` (3 cases), ``b`` (1), ``c`` (2) in hash order ``b, a, c`` and a target of 2
cases → ``b`` (1 case, below 2) then ``a`` (4 cases, reached) → ``{b, a}``; target 1 → ``{b}``; target 0 → ``{}``.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

__all__ = ["GROUP_KEY", "group_of", "group_order", "group_strata", "take_groups"]

#: datalist item key holding the patient group (shared contract with ``medssl ingest``)
GROUP_KEY = "group_id"


def group_of(item: Mapping) -> str:
    """The item's group id: ``item["group_id"]``, or its ``case_id`` when absent (older datalists)."""
    return str(item.get(GROUP_KEY) or item["case_id"])


def group_order(groups: Iterable[str], seed: str, role: str) -> list[str]:
    """Groups sorted by ``sha256(f"{seed}:{role}:{group}")``: machine- and input-order-independent."""
    return sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{role}:{g}".encode()).hexdigest())


def group_strata(members: Mapping[str, list[str]], klass: Mapping[str, str]) -> dict[str, list[str]]:
    """Groups per stratification class, keyed and listed in sorted order.

    A group's class is the majority class of its labelled cases; a tie goes to the smallest class key
    (string order), so ``{"0": 1, "1": 1}`` → ``"0"``. Unstratified splits give every case one class.

    Args:
        members: group id → its labelled case ids (groups without labelled cases are absent).
        klass: case id → class key (string).

    Returns:
        ``{class: [group ids]}``.
    """
    out: dict[str, list[str]] = defaultdict(list)
    for g in sorted(members):
        votes = Counter(klass[c] for c in members[g])
        top = max(votes.values())
        out[min(k for k, n in votes.items() if n == top)].append(g)
    return dict(sorted(out.items()))


def take_groups(ordered: list[str], size: Mapping[str, int], target: int) -> list[str]:
    """The shortest prefix of ``ordered`` holding at least ``target`` cases (``size[g]`` cases per group).

    Prefixes of one order are nested, so larger targets give supersets (1 % ⊂ 5 % ⊂ …). ``target <= 0``
    takes nothing; a target above the total takes every group.
    """
    taken, n = [], 0
    for g in ordered:
        if n >= target:
            break
        taken.append(g)
        n += size[g]
    return taken
