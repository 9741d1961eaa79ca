"""``docker/slurm/launch.sh`` without a cluster: ``medssl_move_dependents OLD NEW`` rewrites exactly the pending
jobs' dependencies that name job OLD (plain job or ``<array>_<task>``; a dependent array by its array id, once),
and the resubmission path of ``medssl_preemptible`` (requeue refused) moves the dependents of the stopped job to
the job it submitted. ``squeue`` / ``scontrol`` / ``sbatch`` are fakes on ``PATH`` that record their arguments;
the same path on the real local cluster is ``test_resubmit_chain.py`` (marker ``slurm``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "docker" / "slurm" / "launch.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")

# squeue -h -t PD -u USER -o "%F|%E" as slurmctld 22.05 prints it (afterok:1:2 is shown as two entries)
SQUEUE = """\
30|afterok:12(unfulfilled)
30|afterok:12(unfulfilled)
31|afterok:12(unfulfilled),afterany:13(unfulfilled)
32|afterok:120(unfulfilled)
33|afterok:13(unfulfilled)?afterok:12(unfulfilled)
34|(null)
35|after:12+5(unfulfilled)
36|afterok:7_3(unfulfilled)
37|afterok:7(unfulfilled)
38|afterok:7_31(unfulfilled)
39|afterok:12:12
"""


def _fakes(tmp: Path, *, scontrol_rc: str = "0") -> dict[str, str]:
    """A bin folder with fake squeue / scontrol / sbatch; every call is appended to ``calls.log``."""
    bin_dir, calls = tmp / "bin", tmp / "calls.log"
    bin_dir.mkdir()
    (tmp / "squeue.out").write_text(SQUEUE)
    scripts = {
        "squeue": f'echo "squeue $*" >> {calls}; cat {tmp / "squeue.out"}',
        # requeue is refused (as with --no-requeue), updates succeed unless told otherwise
        "scontrol": f'echo "scontrol $*" >> {calls}; [ "$1" = requeue ] && exit 1; exit {scontrol_rc}',
        "sbatch": f'echo "sbatch $*" >> {calls}; echo "55;medssl-test"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'set -uo pipefail; source "{LAUNCH}"; {script}'], env=env,
                          capture_output=True, text=True, timeout=60)


def _updates(tmp: Path) -> list[str]:
    return [line.split(" ", 2)[2] for line in (tmp / "calls.log").read_text().splitlines()
            if line.startswith("scontrol update")]


def test_move_dependents_of_a_job(tmp_path: Path) -> None:
    env = _fakes(tmp_path)
    p = _bash("medssl_move_dependents 12 20", env)
    assert p.returncode == 0, p.stderr
    assert _updates(tmp_path) == [
        "JobId=30 Dependency=afterok:20",  # the array 30 once (a pending array is one record, by its array id)
        "JobId=31 Dependency=afterok:20,afterany:13",  # other dependencies kept
        "JobId=33 Dependency=afterok:13?afterok:20",  # OR lists
        "JobId=35 Dependency=after:20+5",  # a time offset
        "JobId=39 Dependency=afterok:20:20",  # OLD twice in a row
    ]  # 32 waits on 120, 34 on nothing, 36-38 on other jobs: untouched
    assert "squeue -h -t PD -u" in (tmp_path / "calls.log").read_text()  # only pending jobs, only this user's
    assert "job 31 now waits on 20 instead of 12" in p.stdout


def test_move_dependents_of_an_array_task(tmp_path: Path) -> None:
    env = _fakes(tmp_path)
    p = _bash("medssl_move_dependents 7_3 9_3", env)
    assert p.returncode == 0, p.stderr
    assert _updates(tmp_path) == ["JobId=36 Dependency=afterok:9_3"]  # not the whole array 7, not task 31


def test_refused_update_is_reported_and_the_rest_moved(tmp_path: Path) -> None:
    env = _fakes(tmp_path, scontrol_rc="1")
    p = _bash("medssl_move_dependents 12 20", env)
    assert p.returncode == 0
    assert len(_updates(tmp_path)) == 5  # every dependent tried
    assert "could not move the dependency of job 31 from 12 to 20" in p.stderr


@pytest.mark.parametrize(("task", "moved"), [("", "20 55"), ("3", "7_3 55_3")])
def test_resubmission_moves_the_dependents(tmp_path: Path, task: str, moved: str) -> None:
    """Requeue refused → ``sbatch --parsable`` of the script → the stopped job's dependents wait on the new id."""
    env = _fakes(tmp_path) | {"SLURM_JOB_ID": "20"}
    if task:
        env |= {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": task}
    script = ('medssl_move_dependents() { echo "MOVE $*"; }; MEDSSL_SBATCH_SCRIPT=job.sbatch '
              'MEDSSL_SBATCH_ARGS=(a b); medssl_preemptible USR1 bash -c "exit 75"')
    p = _bash(script, env)
    assert p.returncode == 75, p.stdout + p.stderr  # the stopped job still ends with 75
    calls = (tmp_path / "calls.log").read_text()
    want = "sbatch --parsable " + (f"--array={task} " if task else "") + "job.sbatch a b"
    assert want in calls, calls
    assert "Submitted batch job 55\n" in p.stdout  # the id alone (sbatch --parsable: "<id>;<cluster>")
    assert f"MOVE {moved}\n" in p.stdout, p.stdout


def test_requeue_moves_nothing(tmp_path: Path) -> None:
    """``scontrol requeue`` keeps the job id: dependencies stay as they are, nothing is resubmitted."""
    env = _fakes(tmp_path) | {"SLURM_JOB_ID": "20"}
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "scontrol $*" >> {tmp_path / "calls.log"}\n')
    (bin_dir / "sleep").write_text("#!/usr/bin/env bash\n")  # launch.sh waits 60 s for slurmctld to end the job
    (bin_dir / "sleep").chmod(0o755)
    p = _bash("MEDSSL_SBATCH_SCRIPT=job.sbatch MEDSSL_SBATCH_ARGS=(); medssl_preemptible USR1 bash -c 'exit 75'", env)
    assert p.returncode == 75
    assert (tmp_path / "calls.log").read_text().splitlines() == ["scontrol requeue 20"]
