"""MONAI bundle support: the parts of ``bundles/ssl_pretrain`` (:mod:`medssl.bundles.pretrain`), override and
``_target_`` checks with one-line errors (:mod:`medssl.bundles.check`) and ``medssl bundle run``
(:mod:`medssl.bundles.run`). The finetuning bundles' parts are in :mod:`medssl.bundle_parts`, their
``multi_gpu_train.yaml`` helpers in :mod:`medssl.bundles.distributed` and the classifier's prediction table in
:mod:`medssl.bundles.classify`."""

from __future__ import annotations

__all__: list[str] = []
