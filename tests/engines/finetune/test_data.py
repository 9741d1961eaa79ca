"""FinetuneConfig and finetuning data: cases per (fraction, seed), preprocessing identical to pretraining,
reproducible random crops, class weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medssl.data.splits import split_datalist
from medssl.engines.finetune.config import FinetuneConfig
from medssl.engines.finetune.data import (
    class_weights,
    datalist_by_case,
    eval_transforms,
    finetune_items,
    make_dataset,
    seed_epoch,
    train_transforms,
)
from medssl.engines.pretrain.data import preprocessing
from medssl.errors import MedsslError


@pytest.fixture(scope="module")
def hippo(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("hippo_data")
    images = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:6]
    items = [
        {"image": str(p), "label": str(hippocampus_dir / "labelsTr" / p.name), "case_id": f"c{i}"}
        for i, p in enumerate(images)
    ]
    (tmp / "datalist.json").write_text(json.dumps({"training": items}))
    splits, _ = split_datalist(
        tmp / "datalist.json", fractions=[50, 100], seeds=[0, 1], test_fraction=0.2, val_fraction=0.2
    )
    return tmp / "datalist.json", splits


# -- config ------------------------------------------------------------------------------------------------
def test_config_yaml_round_trip_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "ft.yaml").write_text(
        "datalist: d.json\nsplits: s.json\nroi_size: 48\nnetwork_kwargs:\n  init_filters: 8\n"
    )
    cfg = FinetuneConfig.from_yaml(
        tmp_path / "ft.yaml",
        overrides=[
            "fraction=10",
            "network_kwargs.init_filters=16",
            "init=ssl:runs:/abc/encoder/encoder.pt",
            "llrd=0.75",
        ],
    )
    assert (
        cfg.roi_size == [48, 48, 48] and cfg.fraction == 10.0 and cfg.network_kwargs == {"init_filters": 16}
    )
    assert cfg.init_kind == "ssl" and cfg.ssl_source == "runs:/abc/encoder/encoder.pt" and cfg.llrd == 0.75
    cfg.to_yaml(tmp_path / "back.yaml")
    assert FinetuneConfig.from_yaml(tmp_path / "back.yaml") == cfg
    assert FinetuneConfig().init_kind == "scratch" and FinetuneConfig().ssl_source is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "classification"}, "does not do classification"),
        ({"init": "pretrained"}, "init must be"),
        ({"init": "ssl:"}, "init must be"),
        ({"fraction": 0}, "fraction"),
        ({"llrd": 1.5}, "llrd"),
        ({"max_epochs": 0}, "max_epochs or max_steps"),
        ({"normalisation": "zscore"}, "normalisation"),
        ({"sw_overlap": 1.0}, "sw_overlap"),
        ({"roi_size": [16, 16]}, "roi_size"),
    ],
)
def test_config_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**changes)
    with pytest.raises(MedsslError, match=message):
        FinetuneConfig.from_dict(changes)


def test_config_unknown_field_named() -> None:
    with pytest.raises(MedsslError, match=r"unknown FinetuneConfig field\(s\) \['epochs'\]"):
        FinetuneConfig.from_dict({"epochs": 3})


# -- data ------------------------------------------------------------------------------------------------
def test_items_follow_the_splits(hippo) -> None:
    datalist, splits_path = hippo
    splits = json.loads(Path(splits_path).read_text())
    for seed in (0, 1):
        for fraction in (50, 100):
            items = finetune_items(datalist, splits_path, fraction=fraction, seed=seed)
            s = splits["seeds"][str(seed)]
            assert [it["case_id"] for it in items["training"]] == s["fractions"][str(fraction)]
            assert [it["case_id"] for it in items["validation"]] == s["validation"]
            assert [it["case_id"] for it in items["test"]] == splits["test"]
            assert all(
                Path(it["image"]).is_file() and Path(it["label"]).is_file()
                for v in items.values()
                for it in v
            )
    with pytest.raises(MedsslError, match=r"seed 7 is not in .* \(seeds: \['0', '1'\]\)"):
        finetune_items(datalist, splits_path, fraction=50, seed=7)


def test_items_bad_inputs(hippo, tmp_path: Path) -> None:
    datalist, splits_path = hippo
    items = json.loads(datalist.read_text())["training"]
    (tmp_path / "short.json").write_text(json.dumps({"training": items[:3]}))
    with pytest.raises(MedsslError, match="not in .*short.json"):
        finetune_items(tmp_path / "short.json", splits_path, fraction=100, seed=0)
    (tmp_path / "nolabel.json").write_text(json.dumps({"training": [{**it, "label": None} for it in items]}))
    with pytest.raises(MedsslError, match="has no 'label'"):
        finetune_items(tmp_path / "nolabel.json", splits_path, fraction=100, seed=0)
    with pytest.raises(MedsslError, match="has no 'class'"):
        finetune_items(datalist, splits_path, fraction=100, seed=0, task="classification")


def test_datalist_by_case_one_lookup_for_every_reader(tmp_path: Path) -> None:
    """Every list section counts, the first item of a case wins, bare paths and id-less items are skipped; the
    training cases, the planner and the self-training pool all read a datalist through it."""
    dl = {
        "training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "case_id": "a"}, "bare.nii.gz"],
        "unlabeled": [{"image": "u.nii.gz", "case_id": "u"}, {"image": "dup.nii.gz", "case_id": "a"}],
        "extra": [{"image": "x.nii.gz", "case_id": "x"}, {"image": "noid.nii.gz"}],
        "meta": {"case_id": "not-a-list"},
    }
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    by_id = datalist_by_case(tmp_path / "dl.json")
    assert sorted(by_id) == ["a", "u", "x"] and by_id["a"]["image"] == "a.nii.gz"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MedsslError, match=r"cannot read datalist .*bad\.json"):
        datalist_by_case(tmp_path / "bad.json")
    with pytest.raises(MedsslError, match=r"cannot read datalist .*missing\.json"):
        datalist_by_case(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    assert datalist_by_case(tmp_path / "list.json") == {}


def test_preprocessing_is_the_pretraining_one(hippo) -> None:
    """Image voxels after finetuning's deterministic chain equal pretraining's, label resampled alongside."""
    item = finetune_items(hippo[0], hippo[1], fraction=100, seed=0)["training"][0]
    for spacing in (None, [1.5, 1.5, 1.5]):
        ours = eval_transforms("segmentation", target_spacing=spacing)(dict(item))
        theirs = preprocessing("robust", spacing)({"image": item["image"]})
        torch.testing.assert_close(ours["image"].as_tensor(), theirs["image"], rtol=0, atol=0)
        assert ours["label"].shape == ours["image"].shape
        assert set(torch.unique(ours["label"]).tolist()) == {0.0, 1.0, 2.0}  # nearest: no mixed classes


def test_random_crops_reproducible_per_epoch(hippo) -> None:
    items = finetune_items(hippo[0], hippo[1], fraction=100, seed=0)["training"][:2]
    ds = make_dataset(items, train_transforms("segmentation", roi_size=[16, 16, 16], num_samples=3))

    def crops(epoch: int) -> list[torch.Tensor]:
        seed_epoch(ds, seed=0, epoch=epoch)
        return [c["image"].as_tensor() for i in range(len(ds)) for c in ds[i]]

    a, b, c = crops(0), crops(0), crops(1)
    assert len(a) == 6 and all(x.shape == (1, 16, 16, 16) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_class_weights_inverse_frequency() -> None:
    items = [{"label": 0}] * 9 + [{"label": 1}] * 3
    torch.testing.assert_close(class_weights(items, 2), torch.tensor([12 / 18, 2.0]))
    w = class_weights([{"label": 0}, {"label": 2}, {"label": 2}, {"label": 1}], 3)
    assert (w * torch.tensor([1.0, 1.0, 2.0])).sum() == pytest.approx(4.0)  # mean weight per case is 1
