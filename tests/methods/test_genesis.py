"""Models Genesis restoration with the BasicUNet encoder-decoder."""

from __future__ import annotations

import torch

from medssl.methods import build_method
from medssl.networks.encoders import build_encoder


def test_trains_and_restores(check_trains, make_batch) -> None:
    enc = build_encoder("unet", img_size=(32, 32, 32), features=(4, 4, 8, 8, 16, 4))
    m = build_method("genesis", enc)
    losses = check_trains(m, size=32, b=2, lr=3e-3)
    assert losses[-1] < 0.9 * losses[0]
    masked = build_method("genesis", enc, kind="l1", region="masked")
    batch = make_batch(2, 32)
    out = masked(batch)
    pred = enc.reconstruct(batch["view1"])
    ref = ((pred - batch["view1_target"]).abs() * batch["view1_mask"]).sum() / batch["view1_mask"].sum()
    torch.testing.assert_close(out["loss"], ref)
    del batch["view1_mask"]
    try:
        masked(batch)
    except KeyError as e:
        assert "view1_mask" in str(e) and "genesis" in str(e)
    else:
        raise AssertionError("missing view1_mask not reported")
