"""Label-fraction sweeps: one declarative pipeline file → pretraining once, then one finetuning run per
(fraction, init, seed), all as MLflow child runs under one parent run per study.

Pipeline file (YAML; paths relative to the working directory, ``${VAR}`` expanded)::

    study: hippocampus-label-efficiency
    experiment: medssl-label-efficiency
    tracking_uri: null                 # default $MLFLOW_TRACKING_URI or sqlite:///./mlruns.db
    out_dir: runs/sweeps               # study folder: <out_dir>/<study>/
    data:                              # either datalist (+ splits) ...
      datalist: runs/data/hippo/datalist.json
      splits: runs/data/hippo/splits.json      # default: beside the datalist; written if missing
      # ... or sources to ingest (into data.out, default <study folder>/data) and split
      sources: ["${MEDSSL_DATASETS}/msd_task04_hippocampus"]
      test_fraction: 0.2
      val_fraction: 0.1
    pretrain: {method: simclr, total_steps: 200, ...}   # a PretrainConfig dict, or {checkpoint: encoder.pt}
    finetune: {task: segmentation, network: SegResNet, max_epochs: 30, ...}   # base FinetuneConfig dict
    fractions: [5, 10, 25, 50, 100]
    inits: [scratch, ssl]
    seeds: [0, 1]
    metric: test_dice_mean

Layout: ``<out_dir>/<study>/data`` (ingested data), ``<out_dir>/<study>/sweep/`` (the first parent run;
a parent made with ``new=True`` gets ``sweep-<run id[:8]>``) holding ``pretrain/`` and one folder per
child ``f<fraction>-<init>-s<seed>``. Re-running the same file finds the parent by its ``medssl.study`` tag,
skips FINISHED children (MLflow status, or the local ``sweep_child.json`` marker when the end status
is still spooled), resumes the others from their folders (``resume="auto"``), and records a failing child
as FAILED with ``medssl.error`` while the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl.errors import MedsslError
from medssl.tracking.mlflow_tracker import MlflowTracker, git_sha, make_client, standard_tags

__all__ = ["Pipeline", "ChildOutcome", "SweepResult", "load_pipeline", "run_sweep", "find_study_runs"]

log = logging.getLogger(__name__)

INITS = ("scratch", "ssl")
_MARKER = "sweep_child.json"


@dataclass
class Pipeline:
    """A parsed pipeline file (see the module docstring); every field is plain data."""

    study: str
    data: dict[str, Any]
    finetune: dict[str, Any]
    fractions: list[float]
    seeds: list[int]
    inits: list[str] = field(default_factory=lambda: list(INITS))
    pretrain: dict[str, Any] | None = None
    metric: str = "test_dice_mean"
    experiment: str = "medssl-sweeps"
    tracking_uri: str | None = None
    out_dir: str = "runs/sweeps"

    def __post_init__(self) -> None:
        if not self.study or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", str(self.study)):
            raise MedsslError(f"study must be a simple name (letters, digits, _ . -), got {self.study!r}")
        bad = [i for i in self.inits if i not in INITS]
        if bad or not self.inits:
            raise MedsslError(f"inits must be a non-empty subset of {list(INITS)}, got {self.inits!r}")
        if "ssl" in self.inits and not self.pretrain:
            raise MedsslError("init 'ssl' needs a 'pretrain' section (a PretrainConfig dict or checkpoint:)")
        if not self.fractions or not self.seeds:
            raise MedsslError("a pipeline needs at least one fraction and one seed")
        self.fractions = [float(f) for f in self.fractions]
        self.seeds = [int(s) for s in self.seeds]
        if not all(0 < f <= 100 for f in self.fractions):
            raise MedsslError(f"fractions are percent in (0, 100], got {self.fractions}")

    @property
    def study_root(self) -> Path:
        """``<out_dir>/<study>``."""
        return Path(self.out_dir) / self.study


@dataclass
class ChildOutcome:
    """One (fraction, init, seed) child of a sweep. ``status``: FINISHED, SKIPPED (finished earlier) or FAILED."""

    key: str
    fraction: float
    init: str
    seed: int
    out_dir: Path
    status: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    study: str
    parent_run_id: str
    sweep_dir: Path
    data_hash: str
    encoder_path: Path | None = None
    pretrain_run_id: str | None = None
    children: list[ChildOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[ChildOutcome]:
        return [c for c in self.children if c.status == "FAILED"]


def _expand(value: Any) -> Any:
    if isinstance(value, str) and ("$" in value or value.startswith("~")):
        out = os.path.expanduser(os.path.expandvars(value))
        missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
        if missing:
            raise MedsslError(f"{value!r}: environment variable(s) {missing} not set")
        return out
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def load_pipeline(source: str | Path | dict[str, Any]) -> Pipeline:
    """Read a pipeline YAML file (or take a dict) and validate it.

    Raises:
        MedsslError: unreadable file, unknown keys (named), or invalid values.
    """
    if isinstance(source, dict):
        data = dict(source)
    else:
        try:
            data = yaml.safe_load(Path(source).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MedsslError(f"cannot read pipeline {source}: {e}") from e
        if not isinstance(data, dict):
            raise MedsslError(f"pipeline {source} must hold a mapping")
    names = {f.name for f in dataclasses.fields(Pipeline)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MedsslError(f"unknown pipeline key(s) {unknown}; valid keys: {sorted(names)}")
    missing = sorted(k for k in ("study", "data", "finetune", "fractions", "seeds") if k not in data)
    if missing:
        raise MedsslError(f"pipeline lacks {missing}")
    try:
        return Pipeline(**_expand(data))
    except TypeError as e:
        raise MedsslError(f"invalid pipeline: {e}") from e


def prepare_data(data: dict[str, Any], study_root: Path, *, fractions: list[float], seeds: list[int]) -> tuple[Path, Path]:
    """The study's ``(datalist.json, splits.json)``: given, or ingested from ``data.sources`` into ``data.out``
    (default ``<study_root>/data``) and split with the pipeline's fractions/seeds; existing files are reused.

    Raises:
        MedsslError: neither ``datalist`` nor ``sources`` given, or ingest/split errors.
    """
    from medssl.data.splits import split_datalist

    unknown = sorted(set(data) - {"datalist", "splits", "sources", "labels", "out", "workers", "test_fraction",
                                  "val_fraction", "stratify_key"})
    if unknown:
        raise MedsslError(f"unknown data key(s) {unknown}")
    if data.get("datalist"):
        datalist = Path(data["datalist"])
        if not datalist.exists():
            raise MedsslError(f"data.datalist {datalist} does not exist")
    elif data.get("sources"):
        out = Path(data.get("out") or study_root / "data")
        datalist = out / "datalist.json"
        if not datalist.exists():
            from medssl.data.ingest import ingest

            log.info("ingesting %s into %s", data["sources"], out)
            ingest(list(data["sources"]), out, labels=data.get("labels"), workers=int(data.get("workers", 1)))
    else:
        raise MedsslError("data needs 'datalist' (+ optional 'splits') or 'sources' to ingest")
    splits = Path(data.get("splits") or datalist.with_name("splits.json"))
    if not splits.exists():
        log.info("writing %s (fractions %s, seeds %s)", splits, fractions, seeds)
        split_datalist(datalist, fractions=fractions, seeds=seeds, out=splits,
                       test_fraction=float(data.get("test_fraction", 0.2)),
                       val_fraction=float(data.get("val_fraction", 0.1)),
                       stratify_key=data.get("stratify_key", "class"))
    return datalist.resolve(), splits.resolve()


def check_fractions_available(splits_path: Path, fractions: list[float], seeds: list[int]) -> None:
    """Every (seed, fraction) exists in the splits and holds every class.

    Raises:
        MedsslError: naming the missing seed or fraction, or the fraction and the class left without cases.
    """
    from medssl.data.splits import fraction_key, load_splits

    sp = load_splits(splits_path)
    all_classes = sorted((sp.get("counts", {}).get("classes") or {}).get("all", {}))
    for seed in seeds:
        s = sp["seeds"].get(str(seed))
        if s is None:
            raise MedsslError(f"seed {seed} is not in {splits_path} (has {sorted(sp['seeds'])}); re-run medssl split")
        for f in fractions:
            fk = fraction_key(f)
            if fk not in s["fractions"]:
                raise MedsslError(f"fraction {fk} % is not in {splits_path} (has {sorted(s['fractions'], key=float)}); "
                                  "re-run medssl split with it")
            counts = (sp.get("counts", {}).get("seeds", {}).get(str(seed), {}).get("classes") or {}).get(fk)
            empty = [c for c in all_classes if counts is not None and not counts.get(c)]
            if empty or not s["fractions"][fk]:
                raise MedsslError(f"fraction {fk} % (seed {seed}) leaves class(es) {empty or ['any']} without cases")


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def find_study_runs(client: Any, study: str, experiment_ids: list[str] | None = None) -> list[Any]:
    """Parent (``medssl.kind = sweep``) runs of ``study``, newest first, in the given or all experiments."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    return list(
        client.search_runs(
            experiment_ids,
            filter_string=f"tags.`medssl.study` = {_quote(study)} and tags.`medssl.kind` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    )


def child_runs(client: Any, parent: Any) -> list[Any]:
    """All child runs of a parent run (any status), newest first."""
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}",
            order_by=["attributes.start_time DESC"],
            max_results=10000,
        )
    )


def _data_hash(datalist: Path, splits: Path) -> str:
    h = hashlib.sha256(datalist.read_bytes())
    h.update(splits.read_bytes())
    return h.hexdigest()[:16]


def _child_key(fraction: float, init: str, seed: int) -> str:
    from medssl.data.splits import fraction_key

    return f"f{fraction_key(fraction)}-{init}-s{seed}"


def _default_finetune(config: Any, *, resume: str | None, progress: bool) -> Any:
    from medssl.engines.finetune import run_finetune

    return run_finetune(config, resume=resume, progress=progress)


def _default_pretrain(config: Any, *, resume: str | Path | None, progress: bool) -> Any:
    from medssl.engines.pretrain import run_pretraining

    return run_pretraining(config, resume=resume, progress=progress)


def run_sweep(
    pipeline: str | Path | dict[str, Any] | Pipeline,
    *,
    new: bool = False,
    finetune_fn: Callable[..., Any] | None = None,
    pretrain_fn: Callable[..., Any] | None = None,
    progress: bool = False,
) -> SweepResult:
    """Run (or resume) a label-efficiency study; the library entry point behind ``medssl sweep``.

    Args:
        pipeline: pipeline YAML path, dict or :class:`Pipeline`.
        new: start a new parent run even if the study exists (default: resume the newest one).
        finetune_fn: ``fn(FinetuneConfig, *, resume, progress) -> result`` with ``.run_id``,
            ``.test_metrics`` and ``.status``; default :func:`medssl.engines.finetune.run_finetune`.
        pretrain_fn: ``fn(PretrainConfig, *, resume, progress) -> result`` with ``.encoder_path`` and
            ``.run_id``; default :func:`medssl.engines.pretrain.run_pretraining`.
        progress: show the engines' progress bars.

    Returns:
        The :class:`SweepResult`; failed children are listed in ``result.failed`` (the sweep goes on).

    Raises:
        MedsslError: invalid pipeline/data (a fraction or seed missing from the splits, a class without
            cases), MLflow unreachable at the start, or a reused SSL checkpoint that does not exist.
    """
    from medssl.engines.finetune_config import FinetuneConfig

    pl = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    finetune_fn = finetune_fn or _default_finetune
    pretrain_fn = pretrain_fn or _default_pretrain
    datalist, splits = prepare_data(pl.data, pl.study_root, fractions=pl.fractions, seeds=pl.seeds)
    check_fractions_available(splits, pl.fractions, pl.seeds)
    base = dict(pl.finetune)
    FinetuneConfig.from_dict({**base, "datalist": str(datalist), "splits": str(splits)})  # fail fast
    data_hash, sha = _data_hash(datalist, splits), git_sha()
    uri = pl.tracking_uri or None

    client = make_client(uri)
    parent_tracker, sweep_dir = _open_parent(client, pl, uri, new, data_hash, sha)
    result = SweepResult(pl.study, parent_tracker.run_id, sweep_dir, data_hash)
    try:
        try:
            existing = _existing_children(client, parent_tracker.run_id)
        except Exception as e:  # noqa: BLE001 - MLflow hiccup: local markers still tell finished children
            log.warning("cannot list child runs of %s (%s); using local markers only", pl.study, e)
            existing = {}
        common = {"experiment": pl.experiment, "tracking_uri": uri, "parent_run_id": parent_tracker.run_id}
        pretrain_error = None
        if "ssl" in pl.inits:
            try:
                result.encoder_path, result.pretrain_run_id = _pretrain(
                    pl, pretrain_fn, datalist, splits, sweep_dir, common, data_hash, progress
                )
            except MedsslError as e:
                if pl.pretrain and pl.pretrain.get("checkpoint"):
                    raise
                pretrain_error = f"pretraining failed: {e}"
                log.error("%s; the ssl children are marked FAILED, scratch children go on", pretrain_error)
            except Exception as e:  # noqa: BLE001
                pretrain_error = f"pretraining failed: {type(e).__name__}: {e}"
                log.exception("pretraining failed; ssl children are marked FAILED")
        parent_tracker.set_tags({"medssl.ssl_checkpoint": str(result.encoder_path or "")})
        todo = [(f, s, i) for f in pl.fractions for s in pl.seeds for i in pl.inits]
        for n, (fraction, seed, init) in enumerate(todo, start=1):
            key = _child_key(fraction, init, seed)
            out = sweep_dir / key
            if existing.get(key) == "FINISHED" or _marker_finished(out):
                marker = _read_marker(out)
                result.children.append(
                    ChildOutcome(key, fraction, init, seed, out, "SKIPPED", marker.get("run_id"),
                                 marker.get("metrics", {}))
                )
                log.info("[%d/%d] %s finished earlier; skipped", n, len(todo), key)
                continue
            tags = {
                **standard_tags("finetune", study=pl.study, init=init, seed=seed, data_hash=data_hash, sha=sha),
                "medssl.fraction": key.split("-")[0][1:],
                "medssl.sweep_key": key,
            }
            cfg_dict = {
                **base, **common, "datalist": str(datalist), "splits": str(splits), "fraction": fraction,
                "seed": seed, "study": pl.study, "out_dir": str(out), "run_name": f"{pl.study}/{key}",
                "tags": {**base.get("tags", {}), **tags},
                "init": "scratch" if init == "scratch" else f"ssl:{result.encoder_path}",
            }
            log.info("[%d/%d] %s", n, len(todo), key)
            outcome = ChildOutcome(key, fraction, init, seed, out, "FAILED")
            try:
                if init == "ssl" and result.encoder_path is None:
                    raise MedsslError(pretrain_error or "no SSL checkpoint")
                res = finetune_fn(FinetuneConfig.from_dict(cfg_dict), resume="auto", progress=progress)
                outcome.run_id = getattr(res, "run_id", None)
                outcome.metrics = {k: float(v) for k, v in (getattr(res, "test_metrics", None) or {}).items()}
                status = str(getattr(res, "status", None) or "finished")
                if status.upper() in ("FAILED", "KILLED"):  # run_finetune: "finished" / "early_stopped"
                    raise MedsslError(f"finetuning ended with status {status}")
                outcome.status = "FINISHED"
                _write_marker(out, outcome)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one failing child never stops the sweep
                outcome.error = f"{type(e).__name__}: {e}"[:1000]
                log.error("child %s failed: %s", key, outcome.error)
                outcome.run_id = _mark_failed(client, pl, uri, common, tags, outcome)
            result.children.append(outcome)
            parent_tracker.log_metrics(
                {
                    "children_done": float(sum(c.status != "FAILED" for c in result.children)),
                    "children_failed": float(len(result.failed)),
                },
                step=n,
            )
        parent_tracker.set_tags({"medssl.children_failed": str(len(result.failed))})
        _write_summary(sweep_dir, result)
    except BaseException:
        parent_tracker.close("KILLED")
        raise
    parent_tracker.close("FINISHED")
    return result


def _open_parent(
    client: Any, pl: Pipeline, uri: str | None, new: bool, data_hash: str, sha: str | None
) -> tuple[MlflowTracker, Path]:
    """Reattach to the study's newest parent run (or create one) and return it with its sweep folder."""
    exp = client.get_experiment_by_name(pl.experiment)
    previous = find_study_runs(client, pl.study, [exp.experiment_id]) if exp is not None else []
    tags = {**standard_tags("sweep", study=pl.study, data_hash=data_hash, sha=sha), "medssl.metric": pl.metric}
    if previous and not new:
        parent = previous[0]
        old_hash = parent.data.tags.get("medssl.data_hash")
        if old_hash and old_hash != data_hash:
            log.warning("study %s: data changed since its parent run (%s → %s)", pl.study, old_hash, data_hash)
        sweep_dir = Path(parent.data.tags.get("medssl.sweep_dir") or pl.study_root / "sweep")
        log.info("resuming study %s (parent run %s, %s)", pl.study, parent.info.run_id, sweep_dir)
        tracker = MlflowTracker(pl.experiment, tracking_uri=uri, client=client, run_id=parent.info.run_id,
                                spool_path=sweep_dir / "mlflow_spool.jsonl", tags=tags)
        return tracker, sweep_dir
    tracker = MlflowTracker(pl.experiment, run_name=pl.study, tracking_uri=uri, client=client, tags=tags)
    sweep_dir = pl.study_root / ("sweep" if not previous else f"sweep-{tracker.run_id[:8]}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tracker.spool_path = sweep_dir / "mlflow_spool.jsonl"
    tracker.set_tags({"medssl.sweep_dir": str(sweep_dir)})
    tracker.log_params(
        {"fractions": pl.fractions, "inits": pl.inits, "seeds": pl.seeds, "metric": pl.metric,
         "data": json.dumps(pl.data, sort_keys=True)}
    )
    log.info("study %s: new parent run %s in %s", pl.study, tracker.run_id, sweep_dir)
    return tracker, sweep_dir


def _existing_children(client: Any, parent_run_id: str) -> dict[str, str]:
    """sweep key → best status among the parent's child runs (FINISHED wins)."""
    out: dict[str, str] = {}
    for run in child_runs(client, client.get_run(parent_run_id)):
        key = run.data.tags.get("medssl.sweep_key")
        if key and out.get(key) != "FINISHED":
            out[key] = run.info.status
    return out


def _pretrain(
    pl: Pipeline, pretrain_fn: Callable[..., Any], datalist: Path, splits: Path, sweep_dir: Path,
    common: dict[str, Any], data_hash: str, progress: bool,
) -> tuple[Path, str | None]:
    """Reuse ``pretrain.checkpoint``, or pretrain once into ``<sweep>/pretrain`` (skipped when finished)."""
    from medssl.config import PretrainConfig

    spec = dict(pl.pretrain or {})
    if spec.get("checkpoint"):
        ckpt = Path(spec["checkpoint"])
        if not ckpt.exists():
            raise MedsslError(f"pretrain.checkpoint {ckpt} does not exist")
        return ckpt.resolve(), None
    out = sweep_dir / "pretrain"
    marker = _read_marker(out)
    if (out / "encoder.pt").exists() and marker.get("status") == "FINISHED":
        log.info("pretraining finished earlier: %s", out / "encoder.pt")
        return (out / "encoder.pt").resolve(), marker.get("run_id")
    spec.setdefault("datalist", str(datalist))
    spec.setdefault("splits", str(splits))
    tags = {**spec.get("tags", {}), "medssl.study": pl.study, "medssl.sweep_key": "pretrain",
            "medssl.data_hash": data_hash}
    cfg = PretrainConfig.from_dict(
        {**spec, **common, "out_dir": str(out), "run_name": f"{pl.study}/pretrain", "tags": tags}
    )
    last = out / "checkpoints" / "last.pt"
    res = pretrain_fn(cfg, resume=last if last.exists() else None, progress=progress)
    encoder = Path(getattr(res, "encoder_path", None) or out / "encoder.pt")
    if not encoder.exists():
        raise MedsslError(f"pretraining wrote no encoder at {encoder}")
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"status": "FINISHED", "run_id": getattr(res, "run_id", None)}))
    return encoder.resolve(), getattr(res, "run_id", None)


def _read_marker(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _marker_finished(out: Path) -> bool:
    return _read_marker(out).get("status") == "FINISHED"


def _write_marker(out: Path, c: ChildOutcome) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{_MARKER}.tmp"
    tmp.write_text(json.dumps({"status": c.status, "run_id": c.run_id, "metrics": c.metrics}))
    os.replace(tmp, out / _MARKER)


def _mark_failed(
    client: Any, pl: Pipeline, uri: str | None, common: dict[str, Any], tags: dict[str, str], c: ChildOutcome
) -> str | None:
    """Tag the child's run (found by its sweep key) FAILED with ``medssl.error``; create one if none exists."""
    try:
        runs = [
            r for r in child_runs(client, client.get_run(common["parent_run_id"]))
            if r.data.tags.get("medssl.sweep_key") == c.key
        ]
        if runs:
            run_id = runs[0].info.run_id
            client.set_tag(run_id, "medssl.error", c.error)
            try:
                client.log_param(run_id, "medssl.error", c.error)
            except Exception:  # noqa: BLE001 - params are immutable: an earlier attempt's error stays
                log.debug("param medssl.error already set on %s", run_id)
            if runs[0].info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
            return run_id
        tr = MlflowTracker(pl.experiment, run_name=f"{pl.study}/{c.key}", tracking_uri=uri, client=client,
                           tags={**tags, "medssl.error": c.error}, parent_run_id=common["parent_run_id"],
                           spool_path=c.out_dir / "mlflow_spool.jsonl", close_timeout_s=10)
        tr.log_params({"medssl.error": c.error, "fraction": c.fraction, "seed": c.seed, "init": c.init})
        tr.close("FAILED")
        return tr.run_id
    except Exception as e:  # noqa: BLE001 - recording the failure must not stop the sweep either
        log.warning("could not record the failure of %s in MLflow: %s", c.key, e)
        return None


def _write_summary(sweep_dir: Path, r: SweepResult) -> None:
    rows = [
        {"key": c.key, "fraction": c.fraction, "init": c.init, "seed": c.seed, "status": c.status,
         "run_id": c.run_id, "metrics": c.metrics, "error": c.error}
        for c in r.children
    ]
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"study": r.study, "parent_run_id": r.parent_run_id, "children": rows}, indent=1)
    )
