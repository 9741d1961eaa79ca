"""Weight EMA in finetuning (``ema_decay``): the averaging rule, what is validated / selected / tested, exact
resume, refused mismatches, hash neutrality when off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medssl.engines.finetune import Finetuner, run_finetune
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import make_dataset
from medssl.engines.finetune.ema import WeightEMA, ema_decay_at
from medssl.engines.finetune.identity import config_identity
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.errors import ConfigMismatchError
from tests.engines.finetune._crash import crash_at_epoch
from tests.engines.finetune.test_engine import adrenal, cls_config  # noqa: F401 - the module's real-data fixture


def test_decay_warms_up_then_holds():
    assert ema_decay_at(0.99, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 8) == pytest.approx(0.5)
    assert ema_decay_at(0.99, 80) == pytest.approx(0.9)
    assert ema_decay_at(0.99, 10_000) == 0.99
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(nn.Linear(2, 2), 1.0)


def test_parameters_and_float_buffers_are_averaged_integer_buffers_copied():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WeightEMA(net, 0.5)
    assert ema.updates == 0 and not ema.module.training
    for p, q in zip(net.parameters(), ema.module.parameters(), strict=True):
        assert torch.equal(p, q) and not q.requires_grad
    history = [{k: v.clone() for k, v in net.state_dict().items()}]
    for _ in range(2):  # a training forward (moves BatchNorm statistics) and a weight change, then one update
        net.train()(torch.randn(8, 3))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        history.append({k: v.clone() for k, v in net.state_dict().items()})
    d0, d1 = ema_decay_at(0.5, 0), ema_decay_at(0.5, 1)  # 0.1, then 2/11
    got = ema.module.state_dict()
    for k, v0 in history[0].items():
        if v0.is_floating_point():
            want = d1 * (d0 * v0 + (1 - d0) * history[1][k]) + (1 - d1) * history[2][k]
            torch.testing.assert_close(got[k], want, msg=k)
        else:  # num_batches_tracked
            assert torch.equal(got[k], history[2][k])
    assert ema.updates == 2
    copy = WeightEMA(net, 0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.decay == 0.5 and copy.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(copy.module.state_dict().values(), got.values(), strict=True))


def test_off_by_default_and_hash_neutral_then():
    base = FinetuneConfig(datalist="d.json", splits="s.json")
    assert base.ema_decay is None and "ema_decay" not in config_identity(base)  # older studies keep their hash
    assert config_identity(base.replace(ema_decay=0.99))["ema_decay"] == 0.99
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            base.replace(ema_decay=bad)


def test_the_average_is_validated_selected_and_tested(adrenal, tmp_path: Path) -> None:  # noqa: F811
    # validation only after the last epoch: best.pt = the average at the end, not the trained weights
    cfg = cls_config(adrenal, tmp_path / "ema", fraction=25, max_epochs=3, val_every=10, ema_decay=0.9)
    res = run_finetune(cfg, progress=False)
    last = load_checkpoint(res.out_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(res.best_checkpoint)
    averaged = {k[len("module."):]: v for k, v in last["ema"]["averaged"].items() if k.startswith("module.")}
    assert best["config"]["ema_decay"] == 0.9 and best["epoch"] == 3
    assert averaged.keys() == best["model"].keys() == last["model"].keys()
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in averaged)  # not the trained weights
    assert int(last["ema"]["averaged"]["n_averaged"]) == 1 + last["step"]  # initial copy + one per step
    ft = Finetuner(cfg)  # an independent evaluation of best.pt on the test set (it rebuilds with the average on)
    ft.eval_model.load_state_dict(best["model"])
    assert ft.eval_model is ft.ema.module
    assert ft.evaluate(make_dataset(ft.items["test"], ft.eval_tf)) == pytest.approx(res.test_metrics, nan_ok=True)


def test_resume_restores_the_average_exactly_and_refuses_a_changed_decay(
    adrenal, tmp_path: Path, monkeypatch  # noqa: F811
) -> None:
    straight = run_finetune(cls_config(adrenal, tmp_path / "straight", fraction=25, max_epochs=3, ema_decay=0.9),
                            progress=False)
    cfg = cls_config(adrenal, tmp_path / "resumed", fraction=25, max_epochs=3, ema_decay=0.9)
    last = crash_at_epoch(cfg, 2, monkeypatch)
    with pytest.raises(ConfigMismatchError, match="ema_decay"):  # another average would not continue this one
        run_finetune(cfg.replace(ema_decay=0.5), resume=last, progress=False)
    with pytest.raises(ConfigMismatchError, match="ema_decay"):  # nor would turning it off
        run_finetune(cfg.replace(ema_decay=None), resume=last, progress=False)
    resumed = run_finetune(cfg, resume="auto", progress=False)
    a = load_checkpoint(straight.out_dir / "checkpoints" / "last.pt")["ema"]["averaged"]
    b = load_checkpoint(last)["ema"]["averaged"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, nan_ok=True)
    no_ema = cls_config(adrenal, tmp_path / "plain", fraction=25, max_epochs=1)
    run_finetune(no_ema, progress=False)
    with pytest.raises(ConfigMismatchError, match="ema_decay"):  # a checkpoint of a run without EMA
        run_finetune(no_ema.replace(ema_decay=0.9, max_epochs=2), resume=tmp_path / "plain" / "checkpoints" / "last.pt",
                     progress=False)
