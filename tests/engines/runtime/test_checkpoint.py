from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.engines.runtime import checkpoint as ck
from medssl.errors import ConfigMismatchError, MedsslError


def test_rng_capture_restore_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.normal()  # exercise numpy's cached gaussian
    state = ck.capture_rng()
    expected = (random.random(), np.random.normal(), torch.rand(3))
    ck.atomic_save({"rng": state}, tmp_path / "r.pt")
    ck.restore_rng(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_atomic_save_leaves_no_temp_and_load_checks(tmp_path: Path) -> None:
    path = ck.atomic_save({"recipe": {"method": "m"}, "x": torch.ones(2)}, tmp_path / "a" / "c.pt")
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]
    assert ck.load_checkpoint(path)["recipe"] == {"method": "m"}
    with pytest.raises(MedsslError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MedsslError, match="cannot read"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(MedsslError, match="no embedded recipe"):
        ck.load_checkpoint(tmp_path / "plain.pt")


def test_recipe_mismatch_names_both_values() -> None:
    saved = {
        "method": "simclr",
        "encoder": {"name": "swinvit", "kwargs": {"feature_size": 12}},
        "in_channels": 1,
        "roi_size": [32, 32, 32],
    }
    ck.check_recipe(saved, json.loads(json.dumps(saved)))
    other = {**saved, "method": "byol", "encoder": {"name": "segresnet", "kwargs": {}}}
    with pytest.raises(ConfigMismatchError) as e:
        ck.check_recipe(saved, other)
    msg = str(e.value)
    assert "'simclr' != 'byol'" in msg and "'swinvit' != 'segresnet'" in msg
    assert set(e.value.fields) == {"method", "encoder.name", "encoder.kwargs"}


def test_component_state_via_generator() -> None:
    class Aug:
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(5)

    a = Aug()
    state = ck.component_state(a)
    x = torch.rand(4, generator=a.generator)
    ck.load_component_state(a, state)
    assert torch.equal(torch.rand(4, generator=a.generator), x)
    assert ck.component_state(object()) is None


def test_save_encoder_files(tmp_path: Path) -> None:
    enc = torch.nn.Conv3d(1, 2, 3)
    enc.downstream = {"UNet": "encoder."}
    recipe = {"encoder": {"name": "x"}, "roi_size": [8, 8, 8], "normalisation": "robust", "in_channels": 1}
    pt, js = ck.save_encoder(tmp_path, enc, recipe)
    loaded = torch.load(pt, weights_only=True)
    assert loaded["recipe"] == recipe and torch.equal(loaded["state_dict"]["weight"], enc.weight)
    how = json.loads(js.read_text())
    assert how["downstream_prefixes"] == {"UNet": "encoder."} and how["preprocessing"]["roi_size"] == [
        8,
        8,
        8,
    ]


def test_machine_info_names_the_kernels_runs_depend_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medssl.engines.runtime import checkpoint as ck

    info = ck.machine_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["cpu"]
    assert (info["cuda"] is None) == (not torch.cuda.is_available())
    assert ck.machine_tag(info) == f"{info['cpu']} | {info['cpu_capability']}" + (
        f" | {info['cuda']} ({info['cuda_capability']})" if info["cuda"] else "")
    assert ck.machine_tag({"cpu": "Xeon", "cpu_capability": "AVX512", "cuda": "NVIDIA H200", "cuda_capability": "9.0"}) \
        == "Xeon | AVX512 | NVIDIA H200 (9.0)"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t: fpu\n")
    assert ck.cpu_model(cpuinfo) == "Test CPU 9000"
    monkeypatch.setattr("platform.processor", lambda: "")
    assert ck.cpu_model(tmp_path / "absent") == "unknown"
