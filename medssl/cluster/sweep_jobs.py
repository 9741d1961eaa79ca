"""A label-fraction sweep as SLURM jobs: pretraining once, then ONE job array with a task per
(fraction, init, seed) child, ``--dependency=afterok:<pretraining>``, all logging into one MLflow parent run;
self-training students (pipeline ``self_training``) as a second array after the first (``afterany``: a student
whose teacher failed fails naming it, the others run), and each further self-training round as one more array after
the previous round's.

The submitter (``medssl sweep FILE --slurm`` / ``--emit-jobs DIR``) prepares the data, creates (or reattaches)
the parent run, writes the resolved pipeline (overrides applied) and the batch scripts, and submits them::

    <study>/slurm/pipeline.yaml      the pipeline every task runs (same config → same child hashes)
    <study>/slurm/pretrain.sbatch    medssl sweep pipeline.yaml --child pretrain --parent-run ID
    <study>/slurm/children.sbatch    #SBATCH --array=0-(N-1): medssl sweep ... --child $SLURM_ARRAY_TASK_ID
    <study>/slurm/students.sbatch    #SBATCH --array=N-(M-1): the students (only with self_training)
    <study>/slurm/students2.sbatch   the second round's students (self_training.rounds: 2), after students.sbatch
    <study>/slurm/submit.sh          the sbatch calls (what --slurm runs; --emit-jobs only writes)
    <study>/slurm/jobs.json          job ids, parent run, child keys (written on submission)

Array task ``i`` runs child ``i`` of :func:`medssl.engines.studies.sweep.run_sweep` (order: fractions × seeds × inits,
as in ``sweep.json``) through the same runner, so tags, markers, resume and failure recording are the local
sweep's. The scripts carry ``docker/slurm/launch.sh``'s preemption trap: ``--signal=B:USR1@T`` → checkpoint →
exit 75 → ``scontrol requeue`` → the task resumes its child (``resume="auto"``). Where requeue is refused the job
resubmits itself (a new id) and moves the jobs waiting on it to the new id first: a resubmitted pretraining job
keeps the array's ``afterok`` satisfiable, however many times in a row it is resubmitted.

``medssl sweep FILE`` afterwards: while any submitted job (or its resubmission, found by job name) is pending or
running it only shows the status (:func:`status_table`: each row's current job, a pending one with the jobs it
waits on); once none is, it resumes as usual (finished children are skipped) and closes the
parent, and ``medssl compare`` reads the study as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medssl.errors import MedsslError

__all__ = ["SweepJobs", "StudentArray", "LAUNCH_SH", "emit_sweep_jobs", "active_jobs", "status_table"]

log = logging.getLogger(__name__)

#: the batch-script helpers (preemption trap + requeue); inlined into every emitted script
LAUNCH_SH = Path(__file__).resolve().parents[2] / "docker" / "slurm" / "launch.sh"

_SCRIPT = """#!/usr/bin/env bash
# medssl sweep {study}: {what} (written by medssl sweep --slurm/--emit-jobs; parent run {parent})
#SBATCH --job-name={job_name}
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@{signal_s}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log_dir}/%x-%A_%a.out
{extra}set -uo pipefail
cd {workdir}
{env}
# ---- docker/slurm/launch.sh (inlined) ----
{launch}
# ----
MEDSSL_SBATCH_SCRIPT={self_path} MEDSSL_SBATCH_ARGS=()
medssl_preemptible USR1 medssl_exec {python} -m medssl.cli sweep {pipeline} --child {child} --parent-run {parent}
"""


@dataclass
class StudentArray:
    """The job array of one self-training round: children ``first``..``last`` (indices into the keys)."""

    round: int
    script: Path
    first: int
    last: int
    job: str | None = None

    def job_name(self, study: str) -> str:
        """``<study>-students`` (round 1), ``<study>-students2`` …"""
        return f"{study}-students" if self.round == 1 else f"{study}-students{self.round}"


@dataclass
class SweepJobs:
    """What :func:`emit_sweep_jobs` wrote (and submitted): scripts, child keys, job ids."""

    study: str
    parent_run_id: str
    folder: Path
    keys: list[str]
    pretrain_script: Path | None
    children_script: Path
    submit_script: Path
    pretrain_job: str | None = None
    children_job: str | None = None
    skipped: list[str] = field(default_factory=list)
    student_arrays: list[StudentArray] = field(default_factory=list)  # one per self-training round, in order

    @property
    def students_script(self) -> Path | None:
        """The first round's students script (``None``: no students)."""
        return self.student_arrays[0].script if self.student_arrays else None

    @property
    def students_from(self) -> int | None:
        """Index of the first student in ``keys`` (``None``: no students)."""
        return self.student_arrays[0].first if self.student_arrays else None

    @property
    def students_job(self) -> str | None:
        """The first round's array job."""
        return self.student_arrays[0].job if self.student_arrays else None

    def job_of(self, i: int) -> str | None:
        """The array job (not yet the task) that runs child ``i``."""
        return next((a.job for a in self.student_arrays if a.first <= i <= a.last), self.children_job)

    def table(self) -> Any:
        """Rich ``Table``: array index, child key, and the jobs."""
        from rich.table import Table

        t = Table(title=f"medssl sweep {self.study} on SLURM (parent run {self.parent_run_id})")
        for col in ("task", "child", "job"):
            t.add_column(col)
        if self.pretrain_script is not None:
            t.add_row("-", "pretrain", self.pretrain_job or f"not submitted: {self.pretrain_script}")
        for i, key in enumerate(self.keys):
            job = f"{self.job_of(i)}_{i}" if self.job_of(i) else "not submitted"
            t.add_row(str(i), key, job + (" (finished earlier)" if key in self.skipped else ""))
        return t


def _sbatch_directives(options: list[str]) -> str:
    return "".join(f"#SBATCH {o}\n" for o in options)


def emit_sweep_jobs(
    pipeline: str | Path | dict[str, Any],
    *,
    overrides: list[str] | None = None,
    new: bool = False,
    out: str | Path | None = None,
    submit: bool = False,
    python: str | None = None,
    sbatch_options: list[str] | None = None,
    max_parallel: int | None = None,
    signal_s: int = 120,
) -> SweepJobs:
    """Write (and with ``submit`` submit) a sweep as one pretraining job + one job array.

    Args:
        pipeline: pipeline YAML path or mapping (as :func:`medssl.engines.studies.sweep.run_sweep`).
        overrides: dotted ``key=value`` changes, applied once here and frozen into ``pipeline.yaml``.
        new: a new parent run even if the study exists.
        out: folder for the scripts (default ``<out_dir>/<study>/slurm``).
        submit: run ``sbatch`` (pretraining first, the array with ``--dependency=afterok:<id>``).
        python: the interpreter with medssl on the compute nodes (default: this one).
        sbatch_options: extra ``#SBATCH`` lines for both scripts, e.g. ``["--partition=gpu", "--gpus=1"]``.
        max_parallel: at most this many array tasks at once (``--array=0-N%K``).
        signal_s: seconds before the time limit at which SLURM sends SIGUSR1 (``--signal=B:USR1@T``).

    Returns:
        The :class:`SweepJobs` (job ids filled when submitted).

    Raises:
        MedsslError: an invalid pipeline or data (as ``run_sweep``), ``docker/slurm/launch.sh`` missing, no
            ``sbatch`` on PATH, or a failed submission (sbatch's message).
    """
    from medssl.engines.studies.pipeline import open_study, student_round
    from medssl.engines.studies.runner import SweepRun

    pl, datalist, splits = open_study(pipeline, overrides)
    if not LAUNCH_SH.is_file():
        raise MedsslError(f"{LAUNCH_SH} not found: the batch scripts inline it (a medssl source checkout)")
    if submit and shutil.which("sbatch") is None:
        raise MedsslError("sbatch not found on PATH: --slurm submits with sbatch (use --emit-jobs DIR to only write)")
    sweep = SweepRun(pl, datalist, splits, finetune_fn=lambda *a, **k: None, progress=False, new=new)
    parent = sweep.parent.run_id
    folder = Path(out) if out is not None else pl.study_root / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    frozen = dataclasses.asdict(pl) | {"data": {**pl.data, "datalist": str(datalist), "splits": str(splits)}}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    children = pl.children()
    keys = [f"f{_fk(f)}-{i}-s{s}" for f, i, s in children]
    from medssl.engines.studies.results import read_marker

    skipped = [k for k in keys if read_marker(sweep.sweep_dir / k).get("status") == "FINISHED"]
    needs_pretrain = "ssl" in pl.inits and not sweep._pretrain_finished()
    common = dict(
        study=pl.study, parent=parent, signal_s=signal_s, log_dir=folder.resolve() / "logs",
        workdir=shlex.quote(str(Path.cwd())), launch=LAUNCH_SH.read_text(),
        python=shlex.quote(python or sys.executable), pipeline=shlex.quote(str((folder / "pipeline.yaml").resolve())),
        env="export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    )
    extra = _sbatch_directives(list(sbatch_options or []))
    pre_path = folder / "pretrain.sbatch" if needs_pretrain else None
    if pre_path is not None:
        pre_path.write_text(_SCRIPT.format(**common, what="pretraining", job_name=f"{pl.study}-pretrain",
                                           extra=extra, self_path=shlex.quote(str(pre_path.resolve())),
                                           child="pretrain"))
    limit = f"%{max_parallel}" if max_parallel else ""
    # Pipeline.children(): the teachers, then each round's students as one contiguous block
    arrays = []
    for r in range(1, pl.rounds + 1):
        idx = [i for i, (_, arm, _) in enumerate(children) if student_round(arm) == r]
        if idx:
            name = "students.sbatch" if r == 1 else f"students{r}.sbatch"
            arrays.append(StudentArray(r, folder / name, idx[0], idx[-1]))
    kids = folder / "children.sbatch"
    n_kids = arrays[0].first if arrays else len(keys)
    kids.write_text(_SCRIPT.format(**common, what=f"{n_kids} children as one array", job_name=pl.study,
                                   extra=_sbatch_directives([f"--array=0-{n_kids - 1}{limit}"]) + extra,
                                   self_path=shlex.quote(str(kids.resolve())),
                                   child='"$SLURM_ARRAY_TASK_ID"'))
    for a in arrays:  # their own array, after the teachers' (one array orders nothing between its tasks)
        a.script.write_text(_SCRIPT.format(
            **common, what=f"{a.last - a.first + 1} self-training students of round {a.round} as one array",
            job_name=a.job_name(pl.study), extra=_sbatch_directives([f"--array={a.first}-{a.last}{limit}"]) + extra,
            self_path=shlex.quote(str(a.script.resolve())), child='"$SLURM_ARRAY_TASK_ID"'))
    lines = ["#!/usr/bin/env bash", "set -euo pipefail", f"cd {shlex.quote(str(folder.resolve()))}"]
    if pre_path is not None:
        lines += ["PRE=$(sbatch --parsable pretrain.sbatch)", "echo \"pretraining: job ${PRE%%;*}\"",
                  "KIDS=$(sbatch --parsable --dependency=afterok:${PRE%%;*} children.sbatch)"]
    else:
        lines += ["KIDS=$(sbatch --parsable children.sbatch)"]
    lines.append("echo \"children: array job ${KIDS%%;*}\"")
    prev = "KIDS"
    for a in arrays:
        var = "STUD" if a.round == 1 else f"STUD{a.round}"
        lines += [f"{var}=$(sbatch --parsable --dependency=afterany:${{{prev}%%;*}} {a.script.name})",
                  f"echo \"students, round {a.round}: array job ${{{var}%%;*}}\""]
        prev = var
    sub = folder / "submit.sh"
    sub.write_text("\n".join(lines) + "\n")
    sub.chmod(0o755)
    for p in (pre_path, kids, *(a.script for a in arrays)):
        if p is not None:
            p.chmod(0o755)
    jobs = SweepJobs(pl.study, parent, folder, keys, pre_path, kids, sub, skipped=skipped, student_arrays=arrays)
    if submit:
        _submit(jobs)
    log.info("study %s: %d children, scripts in %s", pl.study, len(keys), folder)
    return jobs


def _fk(fraction: float) -> str:
    from medssl.data.splits import fraction_key

    return fraction_key(fraction)


def _sbatch(*args: str) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise MedsslError(f"sbatch {' '.join(args)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip().split(";")[0]


def _submit(jobs: SweepJobs) -> None:
    """sbatch the pretraining, then the array depending on it, then each round's students' array after the
    previous array; record ``jobs.json``."""
    dep: list[str] = []
    if jobs.pretrain_script is not None:
        jobs.pretrain_job = _sbatch(str(jobs.pretrain_script))
        dep = [f"--dependency=afterok:{jobs.pretrain_job}"]
    jobs.children_job = _sbatch(*dep, str(jobs.children_script))
    prev = jobs.children_job
    for a in jobs.student_arrays:
        a.job = prev = _sbatch(f"--dependency=afterany:{prev}", str(a.script))
    record = {"study": jobs.study, "parent_run_id": jobs.parent_run_id, "pretrain_job": jobs.pretrain_job,
              "children_job": jobs.children_job, "keys": jobs.keys, "students_job": jobs.students_job,
              "students_from": jobs.students_from,
              "student_arrays": [{"round": a.round, "from": a.first, "to": a.last, "job": a.job,
                                  "name": a.job_name(jobs.study)} for a in jobs.student_arrays]}
    (jobs.folder / "jobs.json").write_text(json.dumps(record, indent=1))
    log.info("submitted: pretraining %s, array %s", jobs.pretrain_job or "-", jobs.children_job)


def _record(pl_study_root: Path) -> dict[str, Any]:
    try:
        return json.loads((pl_study_root / "slurm" / "jobs.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass(frozen=True)
class _Queued:
    """One pending/running job (array task) as ``squeue -r`` shows it."""

    job: str  # "<id>" or "<array id>_<task>"
    state: str  # PENDING, RUNNING, ...
    name: str
    reason: str  # why pending (Dependency, DependencyNeverSatisfied, Resources, ...), "None" when running
    dependency: str  # "afterok:12(unfulfilled)" or "(null)"


def _student_arrays(study: str, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """``jobs.json``'s student arrays (``{"round", "from", "to", "job", "name"}``); a record written before rounds
    existed has one, from ``students_from`` to the last key."""
    if rec.get("student_arrays") is not None:
        return list(rec["student_arrays"])
    if rec.get("students_from") is None:
        return []
    return [{"round": 1, "from": rec["students_from"], "to": len(rec.get("keys", [])) - 1,
             "job": rec.get("students_job"), "name": f"{study}-students"}]


def _queued(pl: Any, rec: dict[str, Any]) -> dict[str, _Queued]:
    """The study's pending/running jobs: by the ids in ``jobs.json`` and by the emitted scripts' job names
    (``<study>``, ``<study>-pretrain``, ``<study>-students`` …): a job that ``launch.sh`` resubmitted (requeue not
    allowed) has a new id."""
    arrays = _student_arrays(pl.study, rec)
    ids = [j for j in (rec.get("pretrain_job"), rec.get("children_job"), *(a.get("job") for a in arrays)) if j]
    if not ids or shutil.which("squeue") is None:
        return {}
    names = ",".join([pl.study, f"{pl.study}-pretrain", *(a["name"] for a in arrays)])
    out: dict[str, _Queued] = {}
    for select in (["-j", ",".join(ids)], ["-n", names, "-u", str(os.getuid())]):
        p = subprocess.run(["squeue", "-h", "-r", *select, "-o", "%i|%T|%j|%r|%E"], capture_output=True,
                           text=True, timeout=60)
        if p.returncode != 0:  # finished jobs age out of squeue: "Invalid job id" means none is active
            continue
        for line in p.stdout.splitlines():
            fields = line.strip().split("|", 4)
            if len(fields) == 5:
                out[fields[0]] = _Queued(*fields)
    return out


def active_jobs(pipeline: str | Path | dict[str, Any], overrides: list[str] | None = None) -> dict[str, str]:
    """Submitted jobs of the study still pending or running: ``{"<job>[_<task>]": state}`` (empty when
    nothing was submitted, all are done, or ``squeue`` is unavailable). Jobs of this user named as the
    emitted scripts name them (``<study>``, ``<study>-pretrain``, ``<study>-students`` …) count too: a pretraining job or an array task
    resubmitted by ``launch.sh`` where requeue is not allowed runs under a new job id."""
    from medssl.engines.studies.pipeline import load_pipeline

    pl = load_pipeline(pipeline, overrides)
    return {job: q.state for job, q in _queued(pl, _record(pl.study_root)).items()}


def _job_id(job: str) -> tuple[int, int]:
    """Sort key: newest submission last (``"12_3"`` → ``(12, 3)``)."""
    head, _, task = job.partition("_")
    return (int(head) if head.isdigit() else -1, int(task) if task.isdigit() else -1)


def _state(q: _Queued) -> str:
    """``RUNNING``; a pending job with its reason and, while it waits on jobs, on which ones."""
    if q.state != "PENDING" or q.reason in ("", "None"):  # "None": not yet looked at by the scheduler
        return q.state
    dep = q.dependency if q.dependency not in ("", "(null)") else ""
    return f"PENDING ({q.reason}{': ' + dep if dep and q.reason.startswith('Dependency') else ''})"


def status_table(pipeline: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Any:
    """Rich ``Table`` of the submitted sweep: each child's current SLURM job and state (a pending task with
    the jobs it waits on) and its ``sweep_child.json`` status.

    A pretraining job or array task that ``launch.sh`` resubmitted (requeue not allowed) is followed by its job
    name: the row shows the newest active job of that name (``<new id> (resubmitted from <id>)``); the array's
    dependency then names that job too (``launch.sh`` moved it).
    """
    from rich.table import Table

    from medssl.engines.studies.pipeline import load_pipeline

    pl = load_pipeline(pipeline, overrides)
    rec = _record(pl.study_root)
    queued = _queued(pl, rec)
    t = Table(title=f"medssl sweep {pl.study}: SLURM jobs still active (parent run {rec.get('parent_run_id')})")
    for col in ("task", "child", "job", "SLURM", "status"):
        t.add_column(col)

    def row(task: str, key: str, first: str, same: list[_Queued]) -> None:
        q = queued.get(first) or (max(same, key=lambda x: _job_id(x.job)) if same else None)
        job = first if q is None or q.job == first else f"{q.job} (resubmitted from {first})"
        t.add_row(task, key, job, _state(q) if q else "done", _status(pl, rec, key))

    pre = rec.get("pretrain_job")
    if pre:
        row("-", "pretrain", pre, [q for q in queued.values() if q.name == f"{pl.study}-pretrain"])
    arrays = _student_arrays(pl.study, rec)
    for i, key in enumerate(rec.get("keys", [])):
        a = next((a for a in arrays if a["from"] <= i <= a["to"]), None)
        array, name = (a.get("job"), a["name"]) if a else (rec.get("children_job"), pl.study)
        mine = [q for q in queued.values() if q.name == name and q.job.partition("_")[2] == str(i)]
        row(str(i), key, f"{array}_{i}", mine)
    return t


def _status(pl: Any, rec: dict[str, Any], key: str) -> str:
    from medssl.engines.studies.results import read_marker

    for folder in sorted(pl.study_root.glob("sweep*")):
        marker = read_marker(folder / key)
        if marker:
            return str(marker.get("status", "?"))
    return "not started"
