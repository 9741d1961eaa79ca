"""SLURM submission of medssl work: sweeps as one pretraining job + one job array (:mod:`.sweep_jobs`).

The batch scripts' preemption/requeue logic is ``docker/slurm/launch.sh``; the engines' side is
:mod:`medssl.engines.runtime.preemption`.
"""

from __future__ import annotations

__all__: list[str] = []
