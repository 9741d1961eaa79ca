"""SimCLR, triplet and VICReg train on tiny contract batches (one test file per loss family keeps CI short)."""

from __future__ import annotations

import pytest

from medssl.methods import build_method
from medssl.networks.encoders import build_encoder


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("simclr", dict(hidden_dim=32, out_dim=16, temperature=0.2)),
        ("triplet", dict(hidden_dim=32, out_dim=16, margin=0.5, mining="semihard")),
        ("vicreg", dict(hidden_dim=32, out_dim=32)),
    ],
)
def test_trains(name: str, kwargs: dict, check_trains) -> None:
    enc = build_encoder("resnet3d", img_size=(16, 16, 16), depth=10, widen_factor=0.125)
    m = build_method(name, enc, **kwargs)
    check_trains(m, size=16)
    assert enc.export_state_dict("ResNet")  # still transferable after training
