"""Label-fraction splits for SSL studies: fixed test set, per-seed validation, nested labelled subsets,
patient groups kept whole, and one study-wide pretraining pool.

``medssl split DATALIST --fractions 1,5,10,25,50,100 --seeds 0,1,2`` writes ``splits.json``::

    {
      "version": 2,
      "test": ["c0a1...", ...],                  # fixed labelled test set, identical for every seed
      "seeds": {
        "0": {
          "validation": ["c3b2...", ...],        # this seed's validation set (disjoint from test)
          "fractions": {"1": [...], "5": [...], ..., "100": [...]}   # labelled training subsets, nested
        }, ...
      },
      "unlabeled": {"0": [...], ...},            # per-seed pool: every volume outside test ∪ this seed's val
      "pretrain_pool": [...],                    # study-wide pool: outside test ∪ EVERY seed's validation
      "params": {"fractions": [1.0, 5.0, ...], "seeds": [0, 1, 2], "test_fraction": 0.2,
                 "val_fraction": 0.1, "stratify_key": "class", "stratified": true, "group_key": "group_id",
                 "fixed_test": false, "fixed_val": false, "datalist": "..."},
      "counts": {"items": 1584, "labelled": 1584, "groups": 1584, "test": 298, "pretrain_pool": 1188,
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
  (segmentation). Other items (the datalist's ``unlabeled`` section, label-less images) only join the pools.
- **Patient groups** (:mod:`medssl.data.split_groups`): items sharing ``group_id`` (absent: the case id) are
  drawn together, so a patient is wholly in the test set, or in one seed's validation set, or in that seed's
  training cases; a fraction holds whole groups too. A group's unlabelled items leave both pools when any of
  its items is held out (same patient). Stratification puts a group in its majority class (ties: the smallest
  class key).
- Sizes are counted in *cases*. Per class (or over all labelled cases when there are no classes) the test set
  takes groups in hash order until it holds ``round(test_fraction · n_class)`` cases (reached or just
  exceeded: a group is never cut), each seed's validation likewise ``round(val_fraction · n_class)`` of the
  rest; fraction ``f`` targets ``max(1, round(f/100 · n_train_class))`` of that seed's training cases, so
  every fraction holds at least one case of every class and proportions follow the full set (``round`` =
  half up). 100 % is every labelled training case of the seed. With one case per group (datalists without
  ``group_id``) every set has exactly its target size, as in version-1 files.
- Order is ``sha256(f"{seed}:{role}:{group_id}")``, not a random generator: identical on every machine and
  numpy version and independent of the input order. Each fraction is a prefix of the same per-class order,
  hence 1 % ⊂ 5 % ⊂ … ⊂ 100 %. The test order uses seed ``"test"``, so the test set is the same for all seeds.
- ``pretrain_pool`` is what pretraining uses by default (:func:`medssl.engines.pretrain.pool.load_pool`): an encoder
  pretrained on it never saw a validation or test case of any seed. Seeds added later (:func:`extend_splits`)
  keep it: they are *reserve seeds* (``params.reserve_seeds``) whose validation sets are drawn from the cases
  the other seeds already hold out, so an encoder pretrained before stays valid for them. (Otherwise the new
  validation sets would leave the pool and the finetuning leakage check, :mod:`medssl.engines.finetune.leakage`, would
  refuse the old encoder for the new seeds.)
- ``fixed_test`` / ``fixed_val`` (e.g. the official MedMNIST splits, taken from the datalist's ``test`` and
  ``validation`` sections by :func:`split_datalist`) replace the drawn sets; labelled cases sharing a group
  with them are left out of training (logged).
- Version-1 files (before groups and ``pretrain_pool``) still load: :func:`load_splits` derives
  ``pretrain_pool`` as every case outside the test set and all validation sets.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medssl.data.split_groups import GROUP_KEY, group_of, group_order, group_strata, take_groups
from medssl.data.splits_io import SPLITS_VERSION, datalist_items, load_splits, write_splits
from medssl.errors import MedsslError

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SPLITS_VERSION", "datalist_items", "extend_splits", "fraction_key", "load_splits", "make_splits",
           "split_datalist", "splits_table", "write_splits"]

logger = logging.getLogger(__name__)

_PLAIN = "__all__"  # the single stratum of unstratified (segmentation) splits


def fraction_key(fraction: float) -> str:
    """JSON key of a fraction in percent: ``1.0`` → ``"1"``, ``12.5`` → ``"12.5"``."""
    return f"{float(fraction):g}"


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up: no banker's rounding surprises


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


def _class_counts(ids: Iterable[str], klass: dict[str, str]) -> dict[str, int]:
    return dict(sorted(Counter(klass[c] for c in ids).items()))


def _check_items(items: list[dict], seeds: Sequence[int], test_fraction: float, val_fraction: float) -> list[str]:
    if not seeds or len(set(seeds)) != len(seeds):
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
    return ids


def make_splits(items: list[dict], *, fractions: list[float], seeds: list[int], test_fraction: float = 0.2,
                val_fraction: float = 0.1, stratify_key: str | None = "class", fixed_test: list[str] | None = None,
                fixed_val: list[str] | None = None, reserve_seeds: Sequence[int] = ()) -> dict:
    """Build the splits described in the module docstring.

    Args:
        items: datalist items, each with a unique ``"case_id"`` and optionally a ``"group_id"`` (patient);
            labelled ones carry ``stratify_key`` (classification) or ``"label"`` (segmentation).
        fractions: labelled fractions in percent, 0 < f ≤ 100 (sorted and de-duplicated), e.g. ``[1, 5, 100]``.
        seeds: one split per seed, e.g. ``[0, 1, 2]``.
        test_fraction: share of labelled cases in the fixed test set (ignored with ``fixed_test``), [0, 1).
        val_fraction: share of labelled cases in each seed's validation set (ignored with ``fixed_val``).
        stratify_key: item key holding the class; ``None`` or absent from all items → unstratified.
        fixed_test: case ids of a given test set (same for all seeds).
        fixed_val: case ids of a given validation set (same for all seeds).
        reserve_seeds: seeds whose validation set is drawn only from the *held-out reserve*, the union of the
            other seeds' validation sets, so that they leave ``pretrain_pool`` unchanged (what
            :func:`extend_splits` uses for seeds added to a study that may already have pretrained). At least one
            seed must not be a reserve seed.

    Returns:
        The splits dict (schema in the module docstring).

    Raises:
        MedsslError: bad fractions/seeds/shares, missing or duplicate case ids, unknown ids in
            ``fixed_test``/``fixed_val``, fixed sets sharing a case or a patient group, no labelled cases, or a
            class without training cases (the error names the fraction and the class).
    """
    fr = _check_fractions(fractions)
    seed_list = [int(s) for s in seeds]
    ids = _check_items(items, seed_list, test_fraction, val_fraction)
    reserve = sorted({int(s) for s in reserve_seeds})
    if set(reserve) - set(seed_list) or set(reserve) >= set(seed_list):
        raise MedsslError(f"reserve_seeds {reserve} must be a subset of the seeds {seed_list} that leaves at least "
                          "one seed to draw the held-out reserve")
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
    gid = {str(it["case_id"]): group_of(it) for it in items}
    members: dict[str, list[str]] = defaultdict(list)  # group → its labelled cases
    for c in sorted(labelled):
        members[gid[c]].append(c)
    size = {g: len(m) for g, m in members.items()}
    strata = group_strata(members, klass)
    n_stratum = {k: sum(size[g] for g in gs) for k, gs in strata.items()}
    all_ids = set(ids)

    def _fixed(given: list[str] | None, what: str) -> set[str] | None:
        if given is None:
            return None
        unknown = sorted(set(map(str, given)) - all_ids)
        if unknown:
            raise MedsslError(f"fixed {what} set names {len(unknown)} unknown case ids, e.g. {unknown[0]}")
        return set(map(str, given))

    test, fval = _fixed(fixed_test, "test"), _fixed(fixed_val, "validation")
    if test is None:
        test_groups: set[str] = set()
        for k, gs in strata.items():
            test_groups.update(take_groups(group_order(gs, "test", "test"), size, _round(test_fraction * n_stratum[k])))
        test = {c for g in test_groups for c in members[g]}
    else:
        test_groups = {gid[c] for c in test}
    fval_groups = {gid[c] for c in fval} if fval is not None else set()
    if fval is not None and fval & test:
        raise MedsslError(f"fixed validation and test sets share {len(fval & test)} case ids")
    if fval_groups & test_groups:
        raise MedsslError(f"fixed validation and test sets share {len(fval_groups & test_groups)} patient groups "
                          f"('{GROUP_KEY}'), e.g. {sorted(fval_groups & test_groups)[0]}: a patient cannot be in both")
    orphans = sorted(c for c in labelled if gid[c] in test_groups | fval_groups and c not in test | (fval or set()))
    if orphans:
        logger.warning("%d labelled cases share a patient group with the fixed test/validation set (e.g. %s): "
                       "left out of training", len(orphans), orphans[0])
    out_seeds: dict[str, dict] = {}
    unlabeled: dict[str, list[str]] = {}
    counts_seeds: dict[str, dict] = {}
    held_out_groups = set(test_groups)
    reserve_groups: set[str] = set()  # validation groups of the non-reserve seeds
    # non-reserve seeds first: their validation sets make the reserve the others draw from
    for seed in sorted(seed_list, key=lambda x: (x in reserve, seed_list.index(x))):
        s = str(seed)
        avail = {k: [g for g in gs if g not in test_groups] for k, gs in strata.items()}
        if seed in reserve:
            avail_val = {k: [g for g in gs if g in reserve_groups] for k, gs in avail.items()}
        else:
            avail_val = avail
        if fval is None:
            val_groups: set[str] = set()
            for k, gs in avail_val.items():
                val_groups.update(take_groups(group_order(gs, s, "val"), size, _round(val_fraction * n_stratum[k])))
            val = {c for g in val_groups for c in members[g]}
        else:
            val, val_groups = set(fval), fval_groups
        held_out_groups |= val_groups
        if seed not in reserve:
            reserve_groups |= val_groups
        train = {k: [g for g in gs if g not in val_groups] for k, gs in avail.items()}
        for k in n_stratum:
            if not train[k]:
                name = "" if k == _PLAIN else f" of class {k!r}"
                raise MedsslError(f"fraction {fraction_key(fr[0])}% cannot hold a case{name}: no labelled "
                                  f"training case{name} is left for seed {s} after test/validation")
        ordered = {k: group_order(gs, s, "train") for k, gs in train.items()}
        n_train = {k: sum(size[g] for g in gs) for k, gs in ordered.items()}
        fractions_out: dict[str, list[str]] = {}
        for f in fr:
            chosen = [c for k, gs in ordered.items()
                      for g in take_groups(gs, size, max(1, _round(f / 100 * n_train[k]))) for c in members[g]]
            fractions_out[fraction_key(f)] = sorted(chosen)
        pool = sorted(c for c in ids if gid[c] not in test_groups | val_groups)
        out_seeds[s] = {"validation": sorted(val), "fractions": fractions_out}
        unlabeled[s] = pool
        counts_seeds[s] = {
            "validation": len(val), "training": sum(n_train.values()), "unlabeled": len(pool),
            "fractions": {k: len(v) for k, v in fractions_out.items()},
        }
        if stratified:
            counts_seeds[s]["classes"] = {k: _class_counts(v, klass) for k, v in fractions_out.items()} | {
                "validation": _class_counts(val & labelled.keys(), klass)}
    out_seeds = {str(x): out_seeds[str(x)] for x in seed_list}  # the caller's seed order
    unlabeled = {str(x): unlabeled[str(x)] for x in seed_list}
    counts_seeds = {str(x): counts_seeds[str(x)] for x in seed_list}
    pretrain_pool = sorted(c for c in ids if gid[c] not in held_out_groups)
    counts: dict = {"items": len(ids), "labelled": len(labelled), "groups": len(set(gid.values())),
                    "test": len(test), "pretrain_pool": len(pretrain_pool), "seeds": counts_seeds}
    if stratified:
        counts["classes"] = {"all": _class_counts(labelled, klass), "test": _class_counts(test & labelled.keys(),
                                                                                          klass)}
    params = {"fractions": fr, "seeds": seed_list, "test_fraction": test_fraction, "val_fraction": val_fraction,
              "stratify_key": stratify_key, "stratified": stratified, "group_key": GROUP_KEY,
              "fixed_test": fixed_test is not None, "fixed_val": fixed_val is not None, "reserve_seeds": reserve}
    return {"version": SPLITS_VERSION, "test": sorted(test), "seeds": out_seeds, "unlabeled": unlabeled,
            "pretrain_pool": pretrain_pool, "params": params, "counts": counts}




def split_datalist(datalist: str | Path, *, fractions: list[float], seeds: list[int], test_fraction: float = 0.2,
                   val_fraction: float = 0.1, out: str | Path | None = None, stratify_key: str | None = "class",
                   use_official: bool = True, reserve_seeds: Sequence[int] = ()) -> tuple[Path, dict]:
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
        reserve_seeds: see :func:`make_splits`.

    Returns:
        ``(path written, splits dict)``.

    Raises:
        MedsslError: unreadable datalist or any :func:`make_splits` error.
    """
    datalist = Path(datalist)
    sections = datalist_items(datalist)
    items = [it for sec in sections.values() for it in sec]
    fixed: dict[str, list[str] | None] = {"test": None, "validation": None}
    for sec in fixed:
        its = sections[sec]
        if use_official and its and all(_is_labelled(it, stratify_key) for it in its):
            fixed[sec] = [it.get("case_id") for it in its]
        elif use_official and its:
            logger.warning("%s: the '%s' section has items without labels: used as unlabelled volumes, "
                           "%s set drawn from the labelled cases", datalist, sec, sec)
    splits = make_splits(items, fractions=fractions, seeds=seeds, test_fraction=test_fraction,
                         val_fraction=val_fraction, stratify_key=stratify_key, fixed_test=fixed["test"],
                         fixed_val=fixed["validation"], reserve_seeds=reserve_seeds)
    splits["params"]["datalist"] = datalist.name
    path = write_splits(splits, Path(out) if out is not None else datalist.with_name("splits.json"))
    logger.info("splits for %d items (%d labelled, %d patient groups, test %d) written to %s",
                splits["counts"]["items"], splits["counts"]["labelled"], splits["counts"]["groups"],
                splits["counts"]["test"], path)
    return path, splits


def extend_splits(datalist: str | Path, splits_path: str | Path, *, fractions: list[float],
                  seeds: list[int], keep_pool: bool = True) -> bool:
    """Add missing seeds / fractions to an existing ``splits.json`` without changing what it holds.

    Splits are pure functions of the case and group ids, the seed and the recorded parameters (hash order,
    see the module docstring), so re-splitting with the union of old and new seeds/fractions reproduces every
    existing entry. That is checked: the fixed test set and each existing seed's validation set and fraction
    subsets must come out identical, otherwise nothing is written. A study can so gain seeds (narrower CIs)
    or fractions later and keep its fixed test set.

    ``pretrain_pool`` is kept (``keep_pool=True``, the default): an encoder may already have been pretrained
    on it, so each added seed is a *reserve seed* (``params.reserve_seeds``, :func:`make_splits`) whose
    validation set is drawn from the cases the existing seeds already hold out (the union of their validation
    sets, in the new seed's hash order). The encoder then never saw a validation or test case of any seed, old
    or new, and needs no re-pretraining. The price: a study extended from seeds ``[0, 1]`` to ``[0, 1, 2]``
    differs in seed 2's validation set from one split with ``[0, 1, 2]`` at the start (every other set is equal).
    With ``keep_pool=False`` the new validation sets are drawn as at the start and leave the pool, which
    shrinks (warned): an encoder pretrained on the old pool then fails
    :func:`medssl.engines.finetune.leakage.check_pretrain_leakage` for the new seeds and must be re-pretrained. A
    version-1 file is rewritten as version 2.

    Args:
        datalist: the datalist the splits were made from.
        splits_path: the existing ``splits.json`` (rewritten in place when something was missing).
        fractions: fractions in percent that must exist.
        seeds: seeds that must exist.
        keep_pool: draw added seeds' validation sets from the held-out reserve so ``pretrain_pool`` stays.

    Returns:
        ``True`` if the file was extended, ``False`` if it already held every seed and fraction.

    Raises:
        MedsslError: unreadable files, or the re-split does not reproduce the existing entries (the datalist
            changed since the split, the file was edited by hand, or a version-1 file cut a patient group) —
            naming the file and what differs.
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
    added = sorted(set(want_seeds) - set(old_seeds))
    reserve = sorted({*map(int, params.get("reserve_seeds", [])), *(added if keep_pool else [])})
    tmp = splits_path.with_name(splits_path.name + ".extending")
    try:
        _, new = split_datalist(
            datalist, fractions=want_fracs, seeds=want_seeds, out=tmp,
            test_fraction=float(params.get("test_fraction", 0.2)), val_fraction=float(params.get("val_fraction", 0.1)),
            stratify_key=params.get("stratify_key", "class"), reserve_seeds=reserve,
        )
        diffs = [] if new["test"] == old["test"] else ["the test set"]
        if keep_pool and new["pretrain_pool"] != old["pretrain_pool"]:
            diffs.append("the pretraining pool")
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
    left = sorted(set(old["pretrain_pool"]) - set(new["pretrain_pool"]))
    if left:
        logger.warning("%s: the study-wide pretrain_pool lost %d cases (now in the new seeds' validation sets, "
                       "e.g. %s): an encoder pretrained on the old pool fails the leakage check when finetuned "
                       "for those seeds; re-pretrain it (a sweep: --new)", splits_path, len(left), ", ".join(left[:3]))
    logger.info("%s: added seeds %s%s, fractions %s; existing test/validation/fraction sets unchanged",
                splits_path, added, " (validation from the held-out reserve, pretrain_pool kept)" if keep_pool and
                added else "", sorted(set(want_fracs) - set(old_fracs)))
    return True


def splits_table(splits: dict, title: str) -> Table:
    """Rich ``Table`` of case counts per seed and fraction (test, validation, each fraction, pools)."""
    from rich.table import Table

    table = Table(title=title)
    fr = list(next(iter(splits["seeds"].values()))["fractions"].keys()) if splits["seeds"] else []
    for col in ["seed", "test", "val"] + [f"{f}%" for f in fr] + ["seed pool", "study pool"]:
        table.add_column(col, justify="right")
    study = str(len(splits["pretrain_pool"])) if "pretrain_pool" in splits else "-"
    for seed, s in splits["seeds"].items():
        pool = splits.get("unlabeled", {}).get(seed, [])
        table.add_row(seed, str(len(splits["test"])), str(len(s["validation"])),
                      *[str(len(s["fractions"][f])) for f in fr], str(len(pool)), study)
    return table
