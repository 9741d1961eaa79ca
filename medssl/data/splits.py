"""Label-fraction splits for SSL studies: fixed test set, per-seed validation, nested labelled subsets.

``medssl split DATALIST --fractions 1,5,10,25,50,100 --seeds 0,1,2`` writes ``splits.json``::

    {
      "version": 1,
      "test": ["c0a1...", ...],                  # fixed labelled test set, identical for every seed
      "seeds": {
        "0": {
          "validation": ["c3b2...", ...],        # this seed's validation set (disjoint from test)
          "fractions": {"1": [...], "5": [...], ..., "100": [...]}   # labelled training subsets, nested
        }, ...
      },
      "unlabeled": {"0": [...], ...},            # pretraining pool per seed: every volume not in test/val
      "params": {"fractions": [1.0, 5.0, ...], "seeds": [0, 1, 2], "test_fraction": 0.2,
                 "val_fraction": 0.1, "stratify_key": "class", "stratified": true,
                 "fixed_test": false, "fixed_val": false, "datalist": "..."},
      "counts": {"items": 1584, "labelled": 1584, "test": 298,
                 "classes": {"all": {"0": 1234, "1": 350}, "test": {"0": 229, "1": 69}},
                 "seeds": {"0": {"validation": 98, "training": 1188, "unlabeled": 1188,
                                 "fractions": {"1": 12, ...},
                                 "classes": {"1": {"0": 9, "1": 3}, ..., "validation": {"0": 76, "1": 22}}}}}
    }

(Numbers of AdrenalMNIST3D with its official val/test sets.) ``counts.classes`` exists only for stratified
splits. All lists hold case ids, sorted, so the file diffs cleanly. Fraction keys are percent of the seed's
labelled training cases, written with ``f"{f:g}"`` (``1``, ``12.5``, ``100``).

Rules:
- *Labelled* items carry the stratification key (classification, e.g. ``"class"``) or a ``"label"`` path
  (segmentation). Other items (the datalist's ``unlabeled`` section, label-less images) only join the
  unlabelled pool.
- Per class (or over all labelled cases when there are no classes) the test set takes
  ``round(test_fraction · n_class)`` cases and each seed's validation ``round(val_fraction · n_class)`` of
  the rest; fraction ``f`` takes ``max(1, round(f/100 · n_train_class))`` of that seed's training cases,
  so every fraction holds at least one case of every class and proportions follow the full set
  (``round`` = half up). 100 % is every labelled training case of the seed.
- Order is ``sha256(f"{seed}:{role}:{case_id}")``, not a random generator: identical on every machine and
  numpy version and independent of the input order. Each fraction is a prefix of the same per-class order,
  hence 1 % ⊂ 5 % ⊂ … ⊂ 100 %. The test order uses seed ``"test"``, so the test set is the same for all seeds.
- ``fixed_test`` / ``fixed_val`` (e.g. the official MedMNIST splits, taken from the datalist's ``test`` and
  ``validation`` sections by :func:`split_datalist`) replace the drawn sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medssl.errors import MedsslError

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SPLITS_VERSION", "extend_splits", "fraction_key", "load_splits", "make_splits", "split_datalist",
           "splits_table", "write_splits"]

logger = logging.getLogger(__name__)

SPLITS_VERSION = 1
_PLAIN = "__all__"  # the single stratum of unstratified (segmentation) splits


def fraction_key(fraction: float) -> str:
    """JSON key of a fraction in percent: ``1.0`` → ``"1"``, ``12.5`` → ``"12.5"``."""
    return f"{float(fraction):g}"


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up: no banker's rounding surprises


def _order(ids: Iterable[str], seed: str, role: str) -> list[str]:
    return sorted(ids, key=lambda c: hashlib.sha256(f"{seed}:{role}:{c}".encode()).hexdigest())


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    try:
        fr = sorted({float(f) for f in fractions})
    except (TypeError, ValueError) as e:
        raise MedsslError(f"fractions must be numbers in percent, got {list(fractions)!r}") from e
    if not fr:
        raise MedsslError("at least one fraction is needed (e.g. 1,5,10,25,50,100)")
    bad = [f for f in fr if not 0 < f <= 100]
    if bad:
        raise MedsslError(f"fractions are percent in (0, 100], got {bad}")
    return fr


def _is_labelled(item: dict, stratify_key: str | None) -> bool:
    return bool(item.get("label")) or (stratify_key is not None and item.get(stratify_key) is not None)


def _strata(ids: Iterable[str], klass: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for c in ids:
        out[klass[c]].append(c)
    return dict(sorted(out.items()))


def _class_counts(ids: Iterable[str], klass: dict[str, str]) -> dict[str, int]:
    return {k: len(v) for k, v in _strata(ids, klass).items()}


def make_splits(items: list[dict], *, fractions: list[float], seeds: list[int], test_fraction: float = 0.2,
                val_fraction: float = 0.1, stratify_key: str | None = "class", fixed_test: list[str] | None = None,
                fixed_val: list[str] | None = None) -> dict:
    """Build the splits described in the module docstring.

    Args:
        items: datalist items, each with a unique ``"case_id"``; labelled ones carry ``stratify_key``
            (classification) or ``"label"`` (segmentation).
        fractions: labelled fractions in percent, 0 < f ≤ 100 (sorted and de-duplicated), e.g. ``[1, 5, 100]``.
        seeds: one split per seed, e.g. ``[0, 1, 2]``.
        test_fraction: share of labelled cases in the fixed test set (ignored with ``fixed_test``), [0, 1).
        val_fraction: share of labelled cases in each seed's validation set (ignored with ``fixed_val``).
        stratify_key: item key holding the class; ``None`` or absent from all items → unstratified.
        fixed_test: case ids of a given test set (same for all seeds).
        fixed_val: case ids of a given validation set (same for all seeds).

    Returns:
        The splits dict (schema in the module docstring).

    Raises:
        MedsslError: bad fractions/seeds/shares, missing or duplicate case ids, unknown ids in
            ``fixed_test``/``fixed_val``, no labelled cases, or a class without training cases (the error
            names the fraction and the class).
    """
    fr = _check_fractions(fractions)
    seed_list = [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise MedsslError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)!r}")
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise MedsslError(f"test_fraction ({test_fraction}) and val_fraction ({val_fraction}) must be in [0, 1) "
                          "and sum to < 1")
    ids: list[str] = []
    for n, it in enumerate(items):
        if not it.get("case_id"):
            raise MedsslError(f"datalist item {n} has no case_id (ingest the data with `medssl ingest` first)")
        ids.append(str(it["case_id"]))
    dupes = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dupes:
        raise MedsslError(f"duplicate case ids in the datalist: {dupes[:5]}")
    labelled = {str(it["case_id"]): it for it in items if _is_labelled(it, stratify_key)}
    if not labelled:
        raise MedsslError("no labelled items (none has a 'label' or a "
                          f"'{stratify_key}' entry): nothing to split into label fractions")
    stratified = stratify_key is not None and any(it.get(stratify_key) is not None for it in labelled.values())
    if stratified:
        missing = [c for c, it in labelled.items() if it.get(stratify_key) is None]
        if missing:
            raise MedsslError(f"{len(missing)} labelled items lack '{stratify_key}' (e.g. {missing[0]}): "
                              "cannot stratify a mix of classified and unclassified cases")
    klass = {c: (str(it[stratify_key]) if stratified else _PLAIN) for c, it in labelled.items()}
    all_ids = set(ids)

    def _fixed(given: list[str] | None, what: str) -> set[str] | None:
        if given is None:
            return None
        unknown = sorted(set(map(str, given)) - all_ids)
        if unknown:
            raise MedsslError(f"fixed {what} set names {len(unknown)} unknown case ids, e.g. {unknown[0]}")
        return set(map(str, given))

    test = _fixed(fixed_test, "test")
    fval = _fixed(fixed_val, "validation")
    if test is None:
        test = set()
        for members in _strata(labelled, klass).values():
            test.update(_order(members, "test", "test")[: _round(test_fraction * len(members))])
    if fval is not None and fval & test:
        raise MedsslError(f"fixed validation and test sets share {len(fval & test)} case ids")
    n_by_class = _class_counts(labelled, klass)
    out_seeds: dict[str, dict] = {}
    unlabeled: dict[str, list[str]] = {}
    counts_seeds: dict[str, dict] = {}
    for seed in seed_list:
        s = str(seed)
        rest = [c for c in labelled if c not in test]
        if fval is None:
            val: set[str] = set()
            for k, members in _strata(rest, klass).items():
                val.update(_order(members, s, "val")[: _round(val_fraction * n_by_class[k])])
        else:
            val = set(fval)
        train = _strata((c for c in rest if c not in val), klass)
        for k in n_by_class:
            if k not in train:
                name = "" if k == _PLAIN else f" of class {k!r}"
                raise MedsslError(f"fraction {fraction_key(fr[0])}% cannot hold a case{name}: no labelled "
                                  f"training case{name} is left for seed {s} after test/validation")
        ordered = {k: _order(members, s, "train") for k, members in train.items()}
        fractions_out: dict[str, list[str]] = {}
        fraction_classes: dict[str, dict[str, int]] = {}
        for f in fr:
            take = {k: max(1, _round(f / 100 * len(members))) for k, members in ordered.items()}
            chosen = [c for k, members in ordered.items() for c in members[: take[k]]]
            fractions_out[fraction_key(f)] = sorted(chosen)
            fraction_classes[fraction_key(f)] = take
        pool = sorted(c for c in ids if c not in test and c not in val)
        out_seeds[s] = {"validation": sorted(val), "fractions": fractions_out}
        unlabeled[s] = pool
        counts_seeds[s] = {
            "validation": len(val), "training": sum(len(m) for m in train.values()), "unlabeled": len(pool),
            "fractions": {k: len(v) for k, v in fractions_out.items()},
        }
        if stratified:
            counts_seeds[s]["classes"] = fraction_classes | {"validation": _class_counts(val & labelled.keys(),
                                                                                          klass)}
    counts: dict = {"items": len(ids), "labelled": len(labelled), "test": len(test), "seeds": counts_seeds}
    if stratified:
        counts["classes"] = {"all": n_by_class, "test": _class_counts(test & labelled.keys(), klass)}
    params = {"fractions": fr, "seeds": seed_list, "test_fraction": test_fraction, "val_fraction": val_fraction,
              "stratify_key": stratify_key, "stratified": stratified, "fixed_test": fixed_test is not None,
              "fixed_val": fixed_val is not None}
    return {"version": SPLITS_VERSION, "test": sorted(test), "seeds": out_seeds, "unlabeled": unlabeled,
            "params": params, "counts": counts}


def write_splits(splits: dict, path: str | Path) -> Path:
    """Write ``splits`` as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1) + "\n")
    return path


def load_splits(path: str | Path) -> dict:
    """Read a ``splits.json`` and check its schema.

    Raises:
        MedsslError: unreadable file, other version, or missing ``test``/``seeds``/``unlabeled`` sections.
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{path}: cannot read splits ({e})") from e
    if not isinstance(splits, dict) or splits.get("version") != SPLITS_VERSION:
        raise MedsslError(f"{path}: not a version-{SPLITS_VERSION} medssl splits file")
    for key in ("test", "seeds", "unlabeled"):
        if key not in splits:
            raise MedsslError(f"{path}: splits file lacks '{key}'")
    for seed, s in splits["seeds"].items():
        if "validation" not in s or "fractions" not in s:
            raise MedsslError(f"{path}: seed {seed} lacks 'validation' or 'fractions'")
    return splits


def _section_items(datalist: dict, section: str) -> list[dict]:
    return [it if isinstance(it, dict) else {"image": it} for it in datalist.get(section) or []]


def split_datalist(datalist: str | Path, *, fractions: list[float], seeds: list[int], test_fraction: float = 0.2,
                   val_fraction: float = 0.1, out: str | Path | None = None, stratify_key: str | None = "class",
                   use_official: bool = True) -> tuple[Path, dict]:
    """Split a decathlon datalist (``medssl ingest`` output) and write ``splits.json``.

    Args:
        datalist: ``datalist.json`` with sections ``training``, ``validation``, ``test``, ``unlabeled``.
        fractions: labelled fractions in percent.
        seeds: seeds.
        test_fraction: share of labelled cases drawn as test set when the datalist has no ``test`` section.
        val_fraction: share drawn per seed as validation when the datalist has no ``validation`` section.
        out: target file; default ``splits.json`` beside the datalist.
        stratify_key: class key (``None`` = never stratify).
        use_official: a non-empty ``test``/``validation`` section whose items all carry labels (official
            MedMNIST splits) is kept as the fixed test/validation set. Otherwise (or when an item lacks its
            label, like MSD's label-less test images) its items are pooled and the set is drawn.

    Returns:
        ``(path written, splits dict)``.

    Raises:
        MedsslError: unreadable datalist or any :func:`make_splits` error.
    """
    datalist = Path(datalist)
    try:
        dl = json.loads(datalist.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MedsslError(f"{datalist}: cannot read datalist ({e})") from e
    if not isinstance(dl, dict):
        raise MedsslError(f"{datalist}: not a decathlon datalist (expected a JSON object with sections)")
    sections = {s: _section_items(dl, s) for s in ("training", "validation", "test", "unlabeled")}
    items = [it for sec in sections.values() for it in sec]
    fixed: dict[str, list[str] | None] = {"test": None, "validation": None}
    for sec in fixed:
        its = sections[sec]
        if use_official and its and all(_is_labelled(it, stratify_key) for it in its):
            fixed[sec] = [it.get("case_id") for it in its]
        elif use_official and its:
            logger.warning("%s: the '%s' section has items without labels: used as unlabelled volumes, "
                           "%s set drawn from the labelled cases", datalist, sec, sec)
    fixed_test, fixed_val = fixed["test"], fixed["validation"]
    splits = make_splits(items, fractions=fractions, seeds=seeds, test_fraction=test_fraction,
                         val_fraction=val_fraction, stratify_key=stratify_key, fixed_test=fixed_test,
                         fixed_val=fixed_val)
    splits["params"]["datalist"] = datalist.name
    path = write_splits(splits, Path(out) if out is not None else datalist.with_name("splits.json"))
    logger.info("splits for %d items (%d labelled, test %d) written to %s", splits["counts"]["items"],
                splits["counts"]["labelled"], splits["counts"]["test"], path)
    return path, splits


def extend_splits(datalist: str | Path, splits_path: str | Path, *, fractions: list[float],
                  seeds: list[int]) -> bool:
    """Add missing seeds / fractions to an existing ``splits.json`` without changing what it holds.

    Splits are pure functions of the case ids, the seed and the recorded parameters (hash order, see the
    module docstring), so re-splitting with the union of old and new seeds/fractions reproduces every
    existing entry. That is checked: the fixed test set and each existing seed's validation set and fraction
    subsets must come out identical, otherwise nothing is written. A study can so gain seeds (narrower CIs)
    or fractions later and keep its fixed test set.

    Args:
        datalist: the datalist the splits were made from.
        splits_path: the existing ``splits.json`` (rewritten in place when something was missing).
        fractions: fractions in percent that must exist.
        seeds: seeds that must exist.

    Returns:
        ``True`` if the file was extended, ``False`` if it already held every seed and fraction.

    Raises:
        MedsslError: unreadable files, or the re-split does not reproduce the existing entries (the datalist
            changed since the split, or the file was edited by hand) — naming the file and what differs.
    """
    splits_path = Path(splits_path)
    old = load_splits(splits_path)
    params = old.get("params", {})
    old_fracs = [float(f) for f in params.get("fractions", [])]
    old_seeds = [int(s) for s in old["seeds"]]
    want_fracs = sorted({*old_fracs, *map(float, fractions)})
    want_seeds = sorted({*old_seeds, *map(int, seeds)})
    if want_fracs == sorted(old_fracs) and want_seeds == sorted(old_seeds):
        return False
    tmp = splits_path.with_name(splits_path.name + ".extending")
    try:
        _, new = split_datalist(
            datalist, fractions=want_fracs, seeds=want_seeds, out=tmp,
            test_fraction=float(params.get("test_fraction", 0.2)), val_fraction=float(params.get("val_fraction", 0.1)),
            stratify_key=params.get("stratify_key", "class"),
        )
        diffs = [] if new["test"] == old["test"] else ["the test set"]
        for seed, s in old["seeds"].items():
            if new["seeds"][seed]["validation"] != s["validation"]:
                diffs.append(f"seed {seed} validation")
            diffs += [f"seed {seed} fraction {k} %" for k, ids in s["fractions"].items()
                      if new["seeds"][seed]["fractions"].get(k) != ids]
        if diffs:
            raise MedsslError(f"{splits_path}: cannot add seeds {sorted(set(want_seeds) - set(old_seeds))} / "
                              f"fractions {sorted(set(want_fracs) - set(old_fracs))}: re-splitting {datalist} "
                              f"changes {', '.join(diffs[:5])} (datalist changed or the file was edited); "
                              "split into a new file instead")
        tmp.replace(splits_path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("%s: added seeds %s, fractions %s; existing test/validation/fraction sets unchanged", splits_path,
                sorted(set(want_seeds) - set(old_seeds)), sorted(set(want_fracs) - set(old_fracs)))
    return True


def splits_table(splits: dict, title: str) -> Table:
    """Rich ``Table`` of case counts per seed and fraction (test, validation, each fraction, unlabeled pool)."""
    from rich.table import Table

    table = Table(title=title)
    fr = list(next(iter(splits["seeds"].values()))["fractions"].keys()) if splits["seeds"] else []
    for col in ["seed", "test", "val"] + [f"{f}%" for f in fr] + ["unlabeled pool"]:
        table.add_column(col, justify="right")
    for seed, s in splits["seeds"].items():
        pool = splits.get("unlabeled", {}).get(seed, [])
        table.add_row(seed, str(len(splits["test"])), str(len(s["validation"])),
                      *[str(len(s["fractions"][f])) for f in fr], str(len(pool)))
    return table
