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
    pretrain: {method: simclr, total_steps: 600, ...}   # PretrainConfig dict, or {checkpoint: encoder.pt}
    finetune: {task: segmentation, network: SegResNet, max_steps: 400, ...}   # base FinetuneConfig dict
    finetune_by_fraction: {5: {val_every: 25}, 100: {val_every: 1}}   # optional per-fraction overrides
    finetune_by_init: {ssl: {network_kwargs: {}}}   # optional per-init overrides (SSL: recipe fixes the net)
    self_training:                     # optional student arms "<init>+st" (medssl.engines.finetune.pseudo)
      inits: [scratch, ssl]            # teacher = the (fraction, init, seed) child; default: every init
      fractions: [5, 10]               # default: every fraction below 100
      rounds: 1                        # 2: "<init>+st2" students taught by the "<init>+st" ones (noisy student)
      pool: seed                       # labelled_share, tta, copy_paste: as FinetuneConfig.self_training
    fractions: [5, 10, 25, 50, 100]
    inits: [scratch, ssl]
    seeds: [0, 1]
    metric: test_dice_mean

This module holds the file format (:class:`Pipeline`, :func:`load_pipeline`) and the data preparation and
checks; the runner is :func:`medssl.engines.studies.sweep.run_sweep`. Layout: ``<out_dir>/<study>/data`` (ingested
data), ``<out_dir>/<study>/sweep/`` (the first parent run; a parent made with ``new=True`` gets
``sweep-<run id[:8]>``) holding ``pretrain/`` and one folder per child ``f<fraction>-<init>-s<seed>``.

Children run in the order of :meth:`Pipeline.children`: fractions × seeds × inits, then the self-training
students (``f5-scratch+st-s0`` …) after every teacher, round by round (``f5-scratch+st2-s0`` after every first-round
student), so adding ``self_training`` (or a round) to a study leaves the existing children (and their SLURM array
indices) as they are.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medssl.config import apply_overrides
from medssl.engines.finetune.pseudo import DEFAULTS as _ST_DEFAULTS
from medssl.engines.finetune.pseudo import OPTIONAL as _ST_OPTIONAL
from medssl.errors import MedsslError

__all__ = ["INITS", "STUDENT", "Pipeline", "load_pipeline", "prepare_data", "check_fractions_available", "open_study",
           "finetune_dict", "teacher_init", "base_init", "student_round", "student_arm"]

log = logging.getLogger(__name__)

INITS = ("scratch", "ssl")
#: suffix of a self-training student arm: ``"scratch+st"`` learns from the ``"scratch"`` child's pseudo-labels,
#: ``"scratch+st2"`` (second round) from the ``"scratch+st"`` child's
STUDENT = "+st"
_ARM_KEYS = ("inits", "fractions", "rounds")  # which students a study has; the rest are each student's options
#: a study's self_training keys: the arm keys and every per-student option of FinetuneConfig.self_training
_ST_KEYS = _ARM_KEYS + tuple(k for k in {**_ST_DEFAULTS, **_ST_OPTIONAL} if k != "teacher")
_STUDENT_ARM = re.compile(r"^(?P<base>[A-Za-z0-9_]+)\+st(?P<round>[2-9]|[1-9][0-9]+)?$")


def student_arm(init: str, round_: int = 1) -> str:
    """The arm of round ``round_``'s students of ``init``: ``("ssl", 1)`` → ``"ssl+st"``, ``("ssl", 2)`` → ``"ssl+st2"``."""
    return f"{init}{STUDENT}" if round_ == 1 else f"{init}{STUDENT}{round_}"


def student_round(arm: str) -> int:
    """0 for a plain init, else the self-training round of a student arm (``"ssl+st"`` → 1, ``"ssl+st2"`` → 2)."""
    m = _STUDENT_ARM.match(arm)
    return 0 if m is None else int(m["round"] or 1)


def base_init(arm: str) -> str:
    """The init an arm's network starts from: ``"ssl+st2"`` → ``"ssl"`` (students start as their first teacher)."""
    m = _STUDENT_ARM.match(arm)
    return arm if m is None else m["base"]


def teacher_init(arm: str) -> str | None:
    """The arm whose child teaches student arm ``arm`` (``"ssl+st"`` → ``"ssl"``, ``"ssl+st2"`` → ``"ssl+st"``);
    ``None`` for a plain init."""
    r = student_round(arm)
    return None if r == 0 else base_init(arm) if r == 1 else student_arm(base_init(arm), r - 1)


@dataclass
class Pipeline:
    """A parsed pipeline file (see the module docstring); every field is plain data.

    Raises:
        MedsslError: a bad study name, unknown init, ``ssl`` without ``pretrain``, no fraction/seed,
            or fractions outside (0, 100].
    """

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
    finetune_by_fraction: dict[Any, dict[str, Any]] = field(default_factory=dict)
    finetune_by_init: dict[str, dict[str, Any]] = field(default_factory=dict)
    self_training: dict[str, Any] | None = None

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
        self._check_self_training()
        if set(self.finetune_by_init) - set(INITS) - set(self.student_arms):
            raise MedsslError(
                f"finetune_by_init keys must be in {list(INITS) + self.student_arms}, got {list(self.finetune_by_init)}"
            )
        extra = {float(k) for k in self.finetune_by_fraction} - set(self.fractions)
        if extra:  # e.g. a quick run with --set fractions=[10,100]: fine, but say so (typos show up here)
            log.warning("finetune_by_fraction names fractions %s not swept %s", sorted(extra), self.fractions)

    def _check_self_training(self) -> None:
        st = self.self_training
        if not st:
            self.self_training = None
            return
        if not isinstance(st, dict):
            raise MedsslError(f"self_training must be a mapping ({', '.join(_ST_KEYS)}), got {st!r}")
        unknown = sorted(set(st) - set(_ST_KEYS))
        if unknown:
            raise MedsslError(f"unknown self_training key(s) {unknown}; valid keys: {list(_ST_KEYS)}")
        inits = list(st.get("inits") or self.inits)
        bad = [i for i in inits if i not in self.inits]
        if bad:
            raise MedsslError(f"self_training.inits {bad} are not swept (inits: {self.inits}): a student needs its teacher")
        fractions = [float(f) for f in (st.get("fractions") or [f for f in self.fractions if f < 100])]
        missing = [f for f in fractions if f not in self.fractions]
        if missing or not fractions:
            raise MedsslError(f"self_training.fractions {missing or fractions} must be swept fractions "
                              f"{self.fractions} (its teachers)")
        rounds = st.get("rounds", 1)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 99:
            raise MedsslError(f"self_training.rounds must be a whole number of rounds in 1..99, got {rounds!r}")
        from medssl.engines.finetune.pseudo import normalise_self_training

        try:  # pool / labelled_share / tta checked as FinetuneConfig checks them
            normalise_self_training({k: v for k, v in st.items() if k not in _ARM_KEYS} | {"teacher": "-"})
        except ValueError as e:
            raise MedsslError(str(e)) from e
        self.self_training = {**st, "inits": inits, "fractions": fractions, "rounds": rounds}

    def round_arms(self, round_: int) -> list[str]:
        """The student arms of one self-training round (``round_`` ≥ 1), one per ``self_training.inits``."""
        return [student_arm(i, round_) for i in (self.self_training or {}).get("inits", [])]

    @property
    def rounds(self) -> int:
        """Self-training rounds (0 without ``self_training``)."""
        return int((self.self_training or {}).get("rounds", 0))

    @property
    def student_arms(self) -> list[str]:
        """The self-training arms, round by round: ``"<init>+st"`` per ``self_training.inits``, then ``"<init>+st2"``
        … (none without ``self_training``)."""
        return [a for r in range(1, self.rounds + 1) for a in self.round_arms(r)]

    @property
    def arms(self) -> list[str]:
        """Every arm: the inits, then the student arms."""
        return list(self.inits) + self.student_arms

    def children(self) -> list[tuple[float, str, int]]:
        """``(fraction, arm, seed)`` of every child in run order: fractions × seeds × inits, then the students
        round by round (fractions × seeds × the round's arms), so that every teacher runs before its students."""
        out = [(f, i, s) for f in self.fractions for s in self.seeds for i in self.inits]
        st = self.self_training or {}
        return out + [(f, a, s) for r in range(1, self.rounds + 1) for f in self.fractions
                      if f in st.get("fractions", []) for s in self.seeds for a in self.round_arms(r)]

    def student_options(self) -> dict[str, Any]:
        """The per-run ``self_training`` options of a student (without its teacher): pool, labelled_share, tta."""
        return {k: v for k, v in (self.self_training or {}).items() if k not in _ARM_KEYS}

    @property
    def study_root(self) -> Path:
        """``<out_dir>/<study>``."""
        return Path(self.out_dir) / self.study


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


def load_pipeline(
    source: str | Path | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None
) -> Pipeline:
    """Read a pipeline YAML file (or take a dict), apply dotted overrides and validate it.

    Args:
        source: YAML path or mapping.
        overrides: ``["seeds=[0]", "finetune.max_steps=100"]`` or ``{"seeds": [0]}`` (YAML-parsed values).

    Raises:
        MedsslError: unreadable file, unknown keys (named), or invalid values.
    """
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        try:
            data = yaml.safe_load(Path(source).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MedsslError(f"cannot read pipeline {source}: {e}") from e
        if not isinstance(data, dict):
            raise MedsslError(f"pipeline {source} must hold a mapping")
    data = apply_overrides(data, overrides or [])
    names = {f.name for f in fields(Pipeline)}
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


def prepare_data(
    data: dict[str, Any], study_root: Path, *, fractions: list[float], seeds: list[int]
) -> tuple[Path, Path]:
    """The study's ``(datalist.json, splits.json)``: given, or ingested from ``data.sources`` into
    ``data.out`` (default ``<study_root>/data``) and split with the pipeline's fractions/seeds; existing
    files are reused, and an existing ``splits.json`` gains the pipeline's seeds/fractions it lacks
    (:func:`medssl.data.splits.extend_splits`: every existing set stays as it is, or nothing is written).
    The splits report (:func:`medssl.data.splits_report.check_splits`) is logged, and a FAIL refuses the study.

    Raises:
        MedsslError: neither ``datalist`` nor ``sources`` given, ingest/split errors, splits that
            cannot be extended without changing them, or a failed leakage check.
    """
    from medssl.data.splits import extend_splits, split_datalist

    unknown = sorted(
        set(data)
        - {
            "datalist",
            "splits",
            "sources",
            "labels",
            "out",
            "workers",
            "test_fraction",
            "val_fraction",
            "stratify_key",
        }
    )
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
    if splits.exists():  # a study extended with seeds/fractions later: add them, keep every existing set
        extend_splits(datalist, splits, fractions=fractions, seeds=seeds)
    else:
        log.info("writing %s (fractions %s, seeds %s)", splits, fractions, seeds)
        split_datalist(
            datalist,
            fractions=fractions,
            seeds=seeds,
            out=splits,
            test_fraction=float(data.get("test_fraction", 0.2)),
            val_fraction=float(data.get("val_fraction", 0.1)),
            stratify_key=data.get("stratify_key", "class"),
        )
    from medssl.data.splits_report import check_splits

    check_splits(datalist, splits)  # logs counts per split/class/group; refuses a leaking split
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
            raise MedsslError(
                f"seed {seed} is not in {splits_path} (has {sorted(sp['seeds'])}); re-run medssl split"
            )
        for f in fractions:
            fk = fraction_key(f)
            if fk not in s["fractions"]:
                raise MedsslError(
                    f"fraction {fk} % is not in {splits_path} (has {sorted(s['fractions'], key=float)}); "
                    "re-run medssl split with it"
                )
            counts = (sp.get("counts", {}).get("seeds", {}).get(str(seed), {}).get("classes") or {}).get(fk)
            empty = [c for c in all_classes if counts is not None and not counts.get(c)]
            if empty or not s["fractions"][fk]:
                raise MedsslError(
                    f"fraction {fk} % (seed {seed}) leaves class(es) {empty or ['any']} without cases"
                )


def open_study(pipeline: str | Path | dict[str, Any] | Pipeline,
               overrides: list[str] | dict[str, Any] | None = None) -> tuple[Pipeline, Path, Path]:
    """What every study command starts with (the sweep, its SLURM jobs, its dry run): the parsed pipeline
    (``overrides`` not with a :class:`Pipeline`), its data prepared (:func:`prepare_data`) and every fraction and
    seed checked in the splits (:func:`check_fractions_available`). Returns ``(pipeline, datalist, splits)``.

    Raises:
        MedsslError: as :func:`load_pipeline`, :func:`prepare_data` and :func:`check_fractions_available`.
    """
    pl = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline, overrides)
    datalist, splits = prepare_data(pl.data, pl.study_root, fractions=pl.fractions, seeds=pl.seeds)
    check_fractions_available(splits, pl.fractions, pl.seeds)
    return pl, datalist, splits


def finetune_dict(pl: Pipeline, fraction: float, init: str) -> dict[str, Any]:
    """The base ``finetune`` mapping updated by ``finetune_by_fraction[fraction]``, then by
    ``finetune_by_init[init]`` (top-level keys replaced, e.g. ``ssl: {network_kwargs: {}}``). A student arm
    (``"ssl+st2"``) gets the mappings of its chain of teachers (``ssl``, then ``ssl+st``), then its own entry."""
    by_fraction = next((v for k, v in pl.finetune_by_fraction.items() if float(k) == fraction), {})
    chain = [init]
    while (t := teacher_init(chain[0])) is not None:
        chain.insert(0, t)
    by_init: dict[str, Any] = {}
    for arm in chain:
        by_init.update(pl.finetune_by_init.get(arm, {}))
    return {**pl.finetune, **by_fraction, **by_init}
