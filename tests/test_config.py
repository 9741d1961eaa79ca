from __future__ import annotations

from pathlib import Path

import pytest

from medssl.config import PretrainConfig, apply_overrides, flatten_dict
from medssl.errors import MedsslError


def test_yaml_with_dotted_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "datalist: d.json\nmethod: simclr\nmethod_kwargs: {temperature: 0.1}\nroi_size: [32, 32, 32]\n"
    )
    cfg = PretrainConfig.from_yaml(
        path,
        overrides=[
            "lr=1e-3",
            "method_kwargs.temperature=0.2",
            "amp=None",
            "roi_size=[16, 24, 32]",
            "encoder_kwargs.depths=[1,1]",
        ],
    )
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.method_kwargs == {"temperature": 0.2} and cfg.amp is None
    assert cfg.roi_size == [16, 24, 32] and cfg.encoder_kwargs == {"depths": [1, 1]}
    again = PretrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    again.to_yaml(tmp_path / "o.yaml")
    assert PretrainConfig.from_yaml(tmp_path / "o.yaml") == cfg


def test_bad_fields_and_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(MedsslError, match="learning_rate"):
        PretrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(MedsslError, match="amp"):
        PretrainConfig.from_dict({}, overrides=["amp=fp8"])
    with pytest.raises(MedsslError, match="key=value"):
        PretrainConfig.from_dict({}, overrides=["lr"])
    with pytest.raises(ValueError, match="roi_size"):
        PretrainConfig(roi_size=[16, 16])
    assert PretrainConfig(roi_size=48, sections="unlabeled").roi_size == [48, 48, 48]
    with pytest.raises(ValueError, match="total_steps or epochs"):
        PretrainConfig(total_steps=0, epochs=0)


def test_flatten_for_mlflow_params() -> None:
    flat = flatten_dict(PretrainConfig(method_kwargs={"temperature": 0.5}).to_dict())
    assert flat["method_kwargs.temperature"] == 0.5 and flat["roi_size"] == [32, 32, 32]
    assert "method_kwargs" not in flat and flat["encoder_kwargs"] == {}
    assert apply_overrides({"a": 1}, {"b.c": 2}) == {"a": 1, "b": {"c": 2}}
