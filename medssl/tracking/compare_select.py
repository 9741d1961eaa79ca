"""Which child runs a study comparison uses: find a study's parent run, its FINISHED children, one run per
(fraction, init, seed), and the configuration check of shared contract 4 (``docs/CONTRACTS.md``).

Every sweep child carries the tag ``medssl.config_hash`` (a short hash of its effective finetune config,
see :mod:`medssl.engines.studies.pipeline`); runs from before config hashes count as hash ``"unknown"``. The values averaged
over seeds in one cell (fraction, init) must come from one configuration, so a cell whose children carry
several hashes is refused unless the caller picks one (``config_hash``). Different cells may legitimately
differ (``finetune_by_fraction`` / ``finetune_by_init`` overrides change the effective config).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from typing import Any

from medssl.errors import MedsslError

__all__ = [
    "HASH_TAG",
    "UNKNOWN_HASH",
    "MACHINE_TAG",
    "UNKNOWN_MACHINE",
    "machine_note",
    "find_study_runs",
    "child_runs",
    "collect_records",
    "known_studies",
]

log = logging.getLogger(__name__)

#: MLflow tag holding a child's effective finetune config hash (written by the sweep)
HASH_TAG = "medssl.config_hash"
#: the hash of children without :data:`HASH_TAG` (runs from before config hashes)
UNKNOWN_HASH = "unknown"
#: the kind of machine a run (last) ran on (:func:`medssl.engines.runtime.checkpoint.machine_tag`)
MACHINE_TAG = "medssl.machine"
#: the machine of children without :data:`MACHINE_TAG` (runs from before it)
UNKNOWN_MACHINE = "unknown"


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def find_study_runs(client: Any, study: str, experiment_ids: list[str] | None = None) -> list[Any]:
    """Parent (``medssl.kind = sweep``) runs of ``study``, newest first, in the given or all experiments."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = f"tags.`medssl.study` = {_quote(study)} and tags.`medssl.kind` = 'sweep'"
    return list(
        client.search_runs(
            experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=1000
        )
    )


def child_runs(client: Any, parent: Any) -> list[Any]:
    """All child runs of a parent run (any status), newest first."""
    query = f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}"
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=query,
            order_by=["attributes.start_time DESC"],
            max_results=10000,
        )
    )


def _finished_children(client: Any, parent: Any) -> list[dict[str, Any]]:
    """FINISHED finetuning children as ``{"key": (fraction, init, seed), "run", "hash", "sweep_key"}``."""
    out = []
    for run in child_runs(client, parent):  # newest first
        t = run.data.tags
        if run.info.status != "FINISHED" or t.get("medssl.kind") == "pretrain":
            continue
        try:
            key = (float(t["medssl.fraction"]), str(t["medssl.init"]), int(t["medssl.seed"]))
        except (KeyError, ValueError):
            continue  # not a (fraction, init, seed) child
        sweep_key = t.get("medssl.sweep_key") or f"f{key[0]:g}-{key[1]}-s{key[2]}"
        out.append({"key": key, "run": run, "hash": t.get(HASH_TAG) or UNKNOWN_HASH, "sweep_key": sweep_key,
                    "machine": t.get(MACHINE_TAG) or UNKNOWN_MACHINE})
    return out


def _select_hash(children: list[dict[str, Any]], config_hash: str, study: str) -> list[dict[str, Any]]:
    """Children of the chosen configuration: ``"latest"`` (per cell, the newest child's hash) or a
    comma-separated list of hashes (or prefixes of them)."""
    if config_hash == "latest":
        newest: dict[tuple[float, str], str] = {}
        for c in children:  # newest first
            newest.setdefault(c["key"][:2], c["hash"])
        return [c for c in children if c["hash"] == newest[c["key"][:2]]]
    wanted = [h.strip() for h in config_hash.split(",") if h.strip()]
    chosen = [c for c in children if any(c["hash"].startswith(h) for h in wanted)]
    if not chosen:
        have = sorted({c["hash"] for c in children})
        raise MedsslError(
            f"study {study!r}: no finished child has config hash {config_hash!r}; hashes present: {have}"
        )
    return chosen


def _check_one_hash_per_cell(records: list[dict[str, Any]], study: str) -> None:
    cells: dict[tuple[float, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r["fraction"], r["init"])][r["config_hash"]].append(r["sweep_key"])
    for (frac, init), by_hash in sorted(cells.items()):
        if len(by_hash) > 1:
            parts = ", ".join(
                f"{h} ({len(keys)} child{'ren' if len(keys) > 1 else ''}, e.g. {sorted(keys)[0]})"
                for h, keys in sorted(by_hash.items())
            )
            raise MedsslError(
                f"study {study!r}: {frac:g} % {init} would average children of {len(by_hash)} different "
                f"finetune configs ({HASH_TAG}): {parts}; '{UNKNOWN_HASH}' = runs without the tag. Compare one "
                "config with --config-hash <hash> or --config-hash latest, or re-run the sweep with --new"
            )


def collect_records(
    client: Any, parent: Any, metric: str, *, config_hash: str | None = None, study: str = ""
) -> list[dict[str, Any]]:
    """One record per (fraction, init, seed) among the FINISHED children of ``parent``.

    Of several runs of one key the newest with a finite ``metric`` is used, else the newest that logged it
    (non-finite), else the newest (metric missing).

    Args:
        client: an ``MlflowClient``.
        parent: the study's parent run.
        metric: metric name, e.g. ``"test_dice_mean"``.
        config_hash: ``None`` (all children; a cell mixing hashes is refused), ``"latest"`` (per cell the
            newest child's hash) or hashes / hash prefixes, comma-separated.
        study: study name for messages.

    Returns:
        Records sorted by key: ``fraction`` (percent), ``init``, ``seed``, ``value`` (float, NaN unless
        ``status == "ok"``), ``status`` (``"ok"``, ``"nonfinite"`` or ``"missing"``), ``run_id``,
        ``config_hash``, ``sweep_key``, ``machine`` (tag ``medssl.machine``; ``"unknown"`` for runs that predate
        it).

    Raises:
        MedsslError: a cell holds children of several config hashes (hashes, counts and an example key
            named), or no child has the requested ``config_hash``.
    """
    children = _finished_children(client, parent)
    if config_hash:
        children = _select_hash(children, config_hash, study)
    by_key: dict[tuple[float, str, int], list[dict[str, Any]]] = defaultdict(list)
    for c in children:  # newest first within each key
        by_key[c["key"]].append(c)
    out = []
    for key, runs in by_key.items():

        def rank(c: dict[str, Any]) -> int:
            v = c["run"].data.metrics.get(metric)
            return 0 if v is not None and math.isfinite(v) else 1 if v is not None else 2

        best = min(runs, key=rank)  # min is stable: the newest of the best rank
        value = best["run"].data.metrics.get(metric)
        status = ("ok", "nonfinite", "missing")[rank(best)]
        out.append(
            {
                "fraction": key[0],
                "init": key[1],
                "seed": key[2],
                "value": float(value) if status == "ok" else math.nan,
                "status": status,
                "run_id": best["run"].info.run_id,
                "config_hash": best["hash"],
                "sweep_key": best["sweep_key"],
                "machine": best["machine"],
            }
        )
    out.sort(key=lambda r: (r["fraction"], r["init"], r["seed"]))
    _check_one_hash_per_cell(out, study)
    for r in out:
        if r["status"] != "ok":
            log.warning("%s: %s %s (run %s)", r["sweep_key"], metric, r["status"], r["run_id"])
    return out


def machine_note(records: list[dict[str, Any]]) -> str | None:
    """A warning when the used runs come from more than one known kind of machine, else ``None``.

    Runs repeat bit for bit only on one kind (CPU kernel capability, GPU): a pair whose arms ran on different
    kinds also differs by the machine, an effect within seed noise but not zero (0.8455 vs 0.8414 test Dice for
    one hippocampus run, benchmarks/RESULTS.md session 11). Runs without the tag are not counted as a kind.
    """
    kinds = Counter(r.get("machine", UNKNOWN_MACHINE) for r in records)
    known = {k: n for k, n in kinds.items() if k != UNKNOWN_MACHINE}
    if len(known) < 2:
        return None
    listed = ", ".join(f"{k}: {n}" for k, n in sorted(known.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"runs of {len(known)} machine kinds ({listed}); runs repeat bit for bit only on one kind, so arms "
            "compared across kinds also differ by the machine (within seed noise)")


def known_studies(client: Any) -> list[str]:
    """Names of the studies (``medssl.study`` of sweep parent runs) in the store; ``[]`` if it cannot be read."""
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(exps, filter_string="tags.`medssl.kind` = 'sweep'", max_results=1000)
            if exps
            else []
        )
    except Exception:  # noqa: BLE001
        return []
    return sorted({r.data.tags.get("medssl.study", "?") for r in runs})
