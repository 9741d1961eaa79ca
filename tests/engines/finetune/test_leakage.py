"""check_pretrain_leakage: an encoder that saw validation/test cases is refused with counts and examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from medssl.data.splits import extend_splits, split_datalist
from medssl.engines.finetune.leakage import check_pretrain_leakage, pretrained_case_ids
from medssl.errors import MedsslError
from tests.engines.finetune.test_engine import hippo, seg_config, ssl_run  # noqa: F401, F811 (fixtures)


def _recipe(ids: list[str]) -> dict:
    return {"encoder": {"name": "tiny"}, "pool": {"case_ids": sorted(ids), "fingerprint": "f", "splits_sha256": None}}


def test_refuses_with_counts_examples_and_source():
    recipe = _recipe([f"c{i}" for i in range(10)])
    with pytest.raises(MedsslError) as ei:
        check_pretrain_leakage(recipe, ["c1", "c2", "c3", "c4", "x9"], ["c7", "t1"], source="runs/p/encoder.pt")
    msg = str(ei.value)
    assert msg.startswith("runs/p/encoder.pt: ")
    assert "4 validation case(s) (c1, c2, c3, …)" in msg and "1 test case(s) (c7)" in msg and "c4" not in msg
    with pytest.raises(MedsslError, match=r"pretrained on 2 test case\(s\) \(c0, c5\) of this run"):
        check_pretrain_leakage(recipe, ["v"], ["c5", "c0"], source="x")


def test_disjoint_pool_passes_and_missing_pool_warns(caplog: pytest.LogCaptureFixture):
    check_pretrain_leakage(_recipe(["a", "b"]), ["c"], ["d"], source="x")
    with caplog.at_level(logging.WARNING, logger="medssl.engines.finetune.leakage"):
        check_pretrain_leakage({"encoder": {"name": "swinvit"}}, ["a"], ["b"], source="external.pt")
        check_pretrain_leakage(None, ["a"], ["b"], source="bare.pt")
    assert "external.pt records no pretraining pool" in caplog.text and "bare.pt" in caplog.text
    assert pretrained_case_ids({"pool": {"case_ids": ["b", "a"]}}) == {"a", "b"}
    assert pretrained_case_ids({"pool": {"fingerprint": "x"}}) is None


def test_seeds_added_after_pretraining_keep_the_encoder_valid(tmp_path: Path):
    """By default an added seed draws its validation set from the held-out reserve: the encoder pretrained
    before it existed passes the leakage check for every seed, old and new."""
    items = [{"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"c{i:02d}"} for i in range(40)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[100], seeds=[0, 1])
    encoder_recipe = _recipe(old["pretrain_pool"])
    assert extend_splits(dl, path, fractions=[100], seeds=[2])
    new = json.loads(path.read_text())
    for s in ("0", "1", "2"):
        check_pretrain_leakage(encoder_recipe, new["seeds"][s]["validation"], new["test"], source="enc.pt")


def test_seeds_added_without_keeping_the_pool_are_caught(tmp_path: Path):
    """extend_splits(keep_pool=False) writes the new, smaller pool; the encoder pretrained on the old one is
    refused for the new seed (whose validation cases it saw) and still accepted for the old seeds."""
    items = [{"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"c{i:02d}"} for i in range(40)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    path, old = split_datalist(dl, fractions=[100], seeds=[0, 1])
    encoder_recipe = _recipe(old["pretrain_pool"])  # pretrained before seed 2 existed
    assert extend_splits(dl, path, fractions=[100], seeds=[2], keep_pool=False)
    new = json.loads(path.read_text())
    for s in ("0", "1"):
        check_pretrain_leakage(encoder_recipe, new["seeds"][s]["validation"], new["test"], source="enc.pt")
    seen = sorted(set(new["seeds"]["2"]["validation"]) & set(old["pretrain_pool"]))
    assert seen and not set(seen) & set(new["pretrain_pool"])
    with pytest.raises(MedsslError, match=rf"enc.pt: .*pretrained on {len(seen)} validation case\(s\) \({seen[0]}"):
        check_pretrain_leakage(encoder_recipe, new["seeds"]["2"]["validation"], new["test"], source="enc.pt")
    check_pretrain_leakage(_recipe(new["pretrain_pool"]), new["seeds"]["2"]["validation"], new["test"], source="x")


def test_finetuning_refuses_an_encoder_that_saw_its_validation_cases(hippo, ssl_run, tmp_path: Path,  # noqa: F811
                                                                      caplog: pytest.LogCaptureFixture):
    """The call site in Finetuner: the SSL recipe's pool against the run's validation/test cases."""
    import torch

    from medssl.engines.finetune.engine import Finetuner

    sp = json.loads(hippo[1].read_text())
    state = torch.load(ssl_run.encoder_path, weights_only=True)
    assert state["recipe"]["pool"]["case_ids"] == ["case0", "case1"]  # its own two volumes: no overlap
    Finetuner(seg_config(hippo, tmp_path / "ok", init=f"ssl:{ssl_run.encoder_path}", network_kwargs={}))
    state["recipe"]["pool"]["case_ids"] += sp["seeds"]["0"]["validation"]
    leaky = tmp_path / "leaky.pt"
    torch.save(state, leaky)
    with pytest.raises(MedsslError, match=r"leaky.pt: the SSL encoder was pretrained on 1 validation case\(s\)"):
        Finetuner(seg_config(hippo, tmp_path / "bad", init=f"ssl:{leaky}", network_kwargs={}))
    del state["recipe"]["pool"]  # an external / older encoder: warned, not refused
    torch.save(state, leaky)
    with caplog.at_level(logging.WARNING, logger="medssl.engines.finetune.leakage"):
        Finetuner(seg_config(hippo, tmp_path / "old", init=f"ssl:{leaky}", network_kwargs={}))
    assert "records no pretraining pool" in caplog.text
