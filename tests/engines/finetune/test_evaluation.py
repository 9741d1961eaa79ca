"""Best-on-validation selection and early stopping (:class:`medssl.engines.finetune.evaluation.Selection`)."""

from __future__ import annotations

import math

from medssl.engines.finetune.evaluation import Selection


def test_first_validation_is_best_even_non_finite_then_finite_wins() -> None:
    sel = Selection("segmentation", patience=0)
    assert sel.update({"dice_mean": math.nan}, epoch=1)  # nothing better yet
    assert sel.update({"dice_mean": 0.2}, epoch=2)  # a finite value beats a NaN best
    assert not sel.update({"dice_mean": math.nan}, epoch=3)
    assert not sel.update({"dice_mean": 0.2}, epoch=4)  # ties do not replace
    assert sel.best == {"metric": 0.2, "epoch": 2, "values": {"dice_mean": 0.2}}
    assert sel.bad_validations == 2 and not sel.stopped  # patience 0: never stops


def test_patience_stops_and_state_round_trips() -> None:
    sel = Selection("classification", patience=2)
    sel.update({"auc": 0.7}, epoch=1)
    sel.update({"auc": 0.6}, epoch=2)
    assert not sel.stopped
    sel.update({"auc": 0.65}, epoch=3)
    assert sel.stopped and sel.best["epoch"] == 1
    again = Selection("classification", patience=2)
    again.load_state_dict(sel.state_dict())
    assert again.state_dict() == {"best": sel.best, "bad_validations": 2, "stopped": True}
    fresh = Selection("classification")
    fresh.load_state_dict({})  # an older last.pt without selection keys
    assert fresh.best is None and fresh.bad_validations == 0 and not fresh.stopped
