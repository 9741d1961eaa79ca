"""Training engines, one package per responsibility: :mod:`medssl.engines.pretrain` (SSL pretraining, ``medssl
pretrain``), :mod:`medssl.engines.finetune` (one finetuning run, ``medssl finetune``), :mod:`medssl.engines.studies`
(label-efficiency sweeps from a pipeline file, ``medssl sweep``) and :mod:`medssl.engines.runtime` (checkpoint
files, DDP, lr schedules, preemption, progress: what the other three share). Each package's ``__init__`` says what
lives in which of its modules and exports the public names.
"""

from __future__ import annotations

__all__ = ["finetune", "pretrain", "runtime", "studies"]
