"""Part of ``bundles/finetune_cls/configs/inference.yaml``: the per-case prediction table of a classifier.

MONAI's ``ClassificationSaver`` / ``CSVSaver`` write one row per case of bare numbers (file name, then the values)
with no header and no predicted class; this handler writes the same rows with a header naming each column
(``image, case, pred_class, pred_name, prob_<class name>…``), so the CSV reads without the recipe at hand.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medssl.data.layouts import stem
from medssl.errors import MedsslError

__all__ = ["PREDICTIONS_CSV", "ClassPredictionWriter"]

log = logging.getLogger(__name__)

#: default file name of the table in ``output_dir``
PREDICTIONS_CSV = "predictions.csv"


class ClassPredictionWriter:
    """Ignite handler: after each iteration, every case's softmax probabilities; on completion, one CSV row per case.

    Reads the evaluator's decollated output: ``pred`` = probabilities ``(K,)`` (after ``Activationsd(softmax)``),
    ``image`` = the preprocessed ``MetaTensor`` whose ``filename_or_obj`` names the input file.

    Columns: ``image`` (input path), ``case`` (file name without ``.nii.gz``), ``pred_class`` (argmax index),
    ``pred_name`` (its name in ``class_names``), ``prob_<name>`` per class in index order (sum to 1).

    Args:
        output_dir: folder of the CSV (created).
        class_names: ``{"0": "benign", "1": "malignant"}`` (a recipe's ``class_names``); default ``class_<i>``.
        filename: CSV file name.

    Raises:
        MedsslError: ``class_names`` keys that are not ``0..K-1``; a prediction that is not a probability vector
            ``(K,)`` matching ``class_names``, or an unwritable CSV (naming the path).
    """

    def __init__(self, output_dir: str | Path, class_names: Mapping[str, str] | None = None,
                 filename: str = PREDICTIONS_CSV) -> None:
        self.path = Path(output_dir) / filename
        try:
            self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        except (TypeError, ValueError) as e:
            raise MedsslError(f"ClassPredictionWriter: class_names keys must be class indices 0..K-1, got "
                              f"{sorted(map(str, class_names or {}))}") from e
        if self.class_names and sorted(self.class_names) != list(range(len(self.class_names))):
            raise MedsslError(f"ClassPredictionWriter: class_names keys must be the class indices 0..K-1, got "
                              f"{sorted(self.class_names)}")
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Any) -> None:
        """Append one row per case of ``engine.state.output``."""
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for it in items:
            meta = getattr(it.get("image"), "meta", {}) or {}
            path = str(meta.get("filename_or_obj", len(self.rows)))
            probs = torch.as_tensor(it["pred"]).detach().float().cpu().reshape(-1)
            names = self.class_names or {i: f"class_{i}" for i in range(probs.numel())}
            if probs.numel() != len(names):
                raise MedsslError(f"ClassPredictionWriter: {path}: prediction of {probs.numel()} values but "
                                  f"{len(names)} classes {names} (a network of another head, or class_names)")
            k = int(probs.argmax())
            row: dict[str, Any] = {"image": path, "case": stem(Path(path)), "pred_class": k, "pred_name": names[k]}
            row |= {f"prob_{names[i]}": float(probs[i]) for i in range(probs.numel())}
            self.rows.append(row)

    def write(self, engine: Any | None = None) -> Path:
        """Write the collected rows to :attr:`path`; returns it."""
        if not self.rows:
            raise MedsslError(f"ClassPredictionWriter: no case was predicted, {self.path} not written")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
                w.writeheader()
                w.writerows(self.rows)
        except OSError as e:
            raise MedsslError(f"cannot write predictions {self.path}: {e}") from e
        log.info("%d case(s) classified → %s", len(self.rows), self.path)
        return self.path
