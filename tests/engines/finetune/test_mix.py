"""Bidirectional copy-paste of (true, pseudo) pairs in a self-training batch (medssl.engines.finetune.mix): pairs
only across the two kinds, boxes swapped in image and label alike, draws a function of (seed, step); the student
uses it, resumes exactly with it, and an existing student's config hash is unchanged without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medssl.engines.finetune import Finetuner, run_finetune
from medssl.engines.finetune.identity import config_hash, config_identity
from medssl.engines.finetune.mix import bidirectional_copy_paste, copy_paste_pairs, mix_generator
from medssl.engines.finetune.pseudo import normalise_self_training
from medssl.engines.runtime.checkpoint import load_checkpoint
from tests.engines.finetune._crash import crash_at_epoch
from tests.engines.finetune.test_self_training import _cfg, synthetic_cases


def test_pairs_cross_true_and_pseudo_only() -> None:
    ids = ["a", "pseudo:b", "c", "pseudo:d", "pseudo:e"]
    pairs = copy_paste_pairs(ids, 1.0, mix_generator(0, 5))
    assert len(pairs) == 2 and {a for a, _ in pairs} == {0, 2} and {b for _, b in pairs} <= {1, 3, 4}
    assert len({b for _, b in pairs}) == 2
    assert copy_paste_pairs(["a", "c"], 1.0, mix_generator(0, 5)) == []
    assert copy_paste_pairs(["pseudo:a", "pseudo:c"], 1.0, mix_generator(0, 5)) == []
    assert copy_paste_pairs(ids, 0.0, mix_generator(0, 5)) == []
    assert copy_paste_pairs(ids, 1.0, mix_generator(0, 5)) == pairs  # a function of (seed, step)
    draws = {tuple(copy_paste_pairs(ids, 1.0, mix_generator(0, s))) for s in range(20)}
    assert len(draws) > 1
    kept = sum(len(copy_paste_pairs(ids, 0.5, mix_generator(1, s))) for s in range(400))
    assert 300 < kept < 500  # 2 pairs per batch, each kept with probability 0.5 → about 400


def test_boxes_swap_image_and_label_alike() -> None:
    img = torch.stack([torch.full((1, 6, 9, 12), float(i)) for i in range(3)])
    lab = torch.stack([torch.full((1, 6, 9, 12), i, dtype=torch.uint8) for i in range(3)])
    out_i, out_l = bidirectional_copy_paste(img, lab, [(0, 2)], mix_generator(3, 0))
    assert torch.equal(img[0], torch.zeros(1, 6, 9, 12))  # inputs untouched
    box0 = out_i[0, 0] == 2.0
    assert int(box0.sum()) == 4 * 6 * 8  # 2/3 of each size
    idx = box0.nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values
    assert torch.equal(hi - lo + 1, torch.tensor([4, 6, 8]))  # one cuboid
    assert torch.equal(out_i[2, 0] == 0.0, box0)  # the same box the other way
    assert torch.equal(out_l[0, 0] == 2, box0) and torch.equal(out_l[2, 0] == 0, box0)  # labels follow the image
    assert torch.equal(out_i[1], img[1]) and torch.equal(out_l[1], lab[1])  # unpaired item unchanged
    again = bidirectional_copy_paste(img, lab, [(0, 2)], mix_generator(3, 0))
    assert torch.equal(again[0], out_i)
    assert bidirectional_copy_paste(img, lab, [], mix_generator(3, 0))[0] is img
    with pytest.raises(ValueError, match="box must be in"):
        bidirectional_copy_paste(img, lab, [(0, 1)], mix_generator(0, 0), box=1.5)
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        bidirectional_copy_paste(img, lab[:, :, :5], [(0, 1)], mix_generator(0, 0))


def test_spec_keeps_copy_paste_only_when_on_and_hashes_stay() -> None:
    assert "copy_paste" not in normalise_self_training({"teacher": "t.pt", "copy_paste": 0})
    assert normalise_self_training({"teacher": "t.pt", "copy_paste": 1})["copy_paste"] == 1.0
    for bad in (1.5, -0.1, "often"):
        with pytest.raises(ValueError, match="copy_paste must be a probability"):
            normalise_self_training({"teacher": "t.pt", "copy_paste": bad})
    base = {"datalist": "d.json", "splits": "s.json", "self_training": {"teacher": "t.pt"}}
    off = config_hash(config_identity(base | {"self_training": {"teacher": "t.pt", "copy_paste": 0.0}}))
    assert off == config_hash(config_identity(base))  # students made before the option keep their hash
    on = config_hash(config_identity(base | {"self_training": {"teacher": "t.pt", "copy_paste": 0.5}}))
    assert on != off


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Path, Path], Path]:
    data = synthetic_cases(tmp_path_factory.mktemp("mix"))
    out = tmp_path_factory.mktemp("mix_teacher") / "run"
    return data, run_finetune(_cfg(data, out, max_steps=6), progress=False).best_checkpoint


def test_student_mixes_its_batches_and_resumes_exactly(data_and_teacher, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data, teacher = data_and_teacher
    st = {"teacher": str(teacher), "tta": False, "copy_paste": 1.0}
    ft = Finetuner(_cfg(data, tmp_path / "probe", self_training=st, max_steps=1))
    assert ft.copy_paste == 1.0 and ft.recipe["self_training"]["copy_paste"] == 1.0
    seen: list[torch.Tensor] = []
    orig = ft.loss_fn.forward
    monkeypatch.setattr(ft.loss_fn, "forward", lambda out, y: (seen.append(y.clone()), orig(out, y))[1])
    labels = {it["case_id"]: it for it in ft.train_ds.data}
    batch = {"image": torch.stack([torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8)]),
             "label": torch.stack([torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8)]),
             "case_id": [ft.items["training"][0]["case_id"], next(c for c in labels if c.startswith("pseudo:"))]}
    ft.train_step(batch)
    y = seen[0]
    assert 0 < int(y[0].sum()) < y[0].numel() and int(y[0].sum()) + int(y[1].sum()) == y[0].numel()
    plain = Finetuner(_cfg(data, tmp_path / "plain", self_training={"teacher": str(teacher), "tta": False},
                           max_steps=1))
    seen.clear()
    monkeypatch.setattr(plain.loss_fn, "forward", lambda out, y: (seen.append(y.clone()), orig(out, y))[1])
    plain.train_step(batch)
    assert torch.equal(seen[0], batch["label"])  # off: the batch as it came
    monkeypatch.undo()
    kw = dict(self_training=st, max_steps=0, max_epochs=3, deterministic=True)
    straight = run_finetune(_cfg(data, tmp_path / "a", **kw), progress=False)
    cfg = _cfg(data, tmp_path / "b", **kw)
    resumed = run_finetune(cfg, resume=crash_at_epoch(cfg, 2, monkeypatch), progress=False)
    a, b = load_checkpoint(straight.best_checkpoint), load_checkpoint(resumed.best_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    no_mix = run_finetune(_cfg(data, tmp_path / "c", **(kw | {"self_training": st | {"copy_paste": 0.0}})),
                          progress=False)
    c = load_checkpoint(no_mix.best_checkpoint)
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # mixing changed training
