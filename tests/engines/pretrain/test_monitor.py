from __future__ import annotations

import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.config import PretrainConfig
from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.pretrain.monitor import build_monitor, build_probe_set, knn_scores, probe_items
from medssl.engines.pretrain.pool import load_pool
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.studies.identity import pretrain_identity
from tests.engines.conftest import toy_config


def _naive_knn(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor, k: int, t: float = 0.07) -> list[int]:
    """Loop reference: per sample, the k most similar samples of other cases vote exp(cos / t)."""
    preds = []
    for i in range(len(z)):
        sims = [(float(F.cosine_similarity(z[i], z[j], dim=0)), j) for j in range(len(z)) if g[j] != g[i]]
        votes: dict[int, float] = {}
        for s, j in sorted(sims, reverse=True)[:k]:
            votes[int(y[j])] = votes.get(int(y[j]), 0.0) + math.exp(s / t)
        preds.append(max(votes, key=votes.get))
    return preds


def test_knn_separable_is_exact_and_shuffled_is_chance() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    z = F.one_hot(y, 3).float() * 5 + 0.1 * torch.randn(60, 3, generator=gen)  # three tight clusters
    groups = torch.arange(60)  # one sample per case: leave-one-out
    s = knn_scores(z, y, groups, k=20)
    assert s == {"knn_acc": 1.0, "knn_balanced_acc": 1.0, "knn_k": 20.0}
    shuffled = y[torch.randperm(60, generator=gen)]
    accs = [knn_scores(torch.randn(300, 16, generator=gen), torch.arange(300) % 2, torch.arange(300))["knn_acc"]
            for _ in range(5)]
    assert abs(np.mean(accs) - 0.5) < 0.06  # random embeddings: chance for 2 classes
    assert knn_scores(z, shuffled, groups)["knn_balanced_acc"] < 0.6  # labels unrelated to the clusters


def test_knn_matches_loop_reference_and_balanced_accuracy_by_hand() -> None:
    gen = torch.Generator().manual_seed(1)
    z, y, g = torch.randn(40, 8, generator=gen), torch.randint(0, 3, (40,), generator=gen), torch.arange(40) // 3
    for k in (1, 5, 20):
        pred = torch.tensor(_naive_knn(z, y, g, k))
        s = knn_scores(z, y, g, k=k)
        assert s["knn_acc"] == pytest.approx(float((pred == y).float().mean()))
    # a tight cluster of 3 class-0 samples and a lone class-1 sample, k=1: class 0 all right, class 1 wrong
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [1.0, 0.5]])
    s = knn_scores(z1, torch.tensor([0, 0, 0, 1]), torch.arange(4), k=1)
    assert s["knn_acc"] == 0.75 and s["knn_balanced_acc"] == 0.5  # recalls 1.0 (class 0), 0.0 (class 1)


def test_leave_one_case_out_never_matches_the_same_case() -> None:
    # case i holds one sample of each class: 0.3 * class direction + a strong case direction, so a sample's
    # nearest neighbour is its own case's sample of the *other* class; across cases only the class counts
    u = torch.eye(8)[:2]  # class directions
    w = torch.eye(8)[2:6]  # 4 case directions
    z = torch.stack([0.3 * u[c] + w[i] for i in range(4) for c in range(2)])  # (8, 8)
    y, g = torch.tensor([0, 1] * 4), torch.arange(8) // 2
    assert knn_scores(z, y, g, k=1)["knn_acc"] == 1.0
    assert knn_scores(z, y, torch.arange(8), k=1)["knn_acc"] == 0.0  # per-sample groups: the twin leaks
    assert knn_scores(z, y, g, k=50)["knn_k"] == 6.0  # capped by the 6 samples of other cases
    from medssl.errors import MedsslError

    with pytest.raises(MedsslError, match="at least 2 cases"):
        knn_scores(z, y, torch.zeros(8))


def _write_seg_datalist(folder: Path, n: int = 9) -> Path:
    """``n`` 14–18³ volumes whose label map has classes 1 and 2 in two blocks; image = label + noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(14, 19, size=3))
        lab = np.zeros(shape, np.int16)
        lab[3:7, 3:9, 4:10] = 1
        lab[8:12, 5:11, 4:10] = 2
        img = (lab + 0.1 * rng.random(shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), folder / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "case_id": f"c{i}", "group_id": f"g{i}"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": items[:-1], "test": items[-1:], "unlabeled": []}))
    return path


@pytest.fixture(scope="module")
def seg_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_seg_datalist(tmp_path_factory.mktemp("seg"))


def test_probe_set_never_holds_test_or_validation_cases(seg_datalist: Path, tmp_path: Path) -> None:
    from medssl.data.splits import split_datalist

    path, sp = split_datalist(seg_datalist, fractions=[100], seeds=[0, 1], test_fraction=0.25, val_fraction=0.2,
                              out=tmp_path / "splits.json")
    held = set(sp["test"]).union(*(s["validation"] for s in sp["seeds"].values()))
    pool = load_pool(seg_datalist, splits=path)
    kind, items = probe_items(seg_datalist, pool, path, max_cases=32)
    ids = {it["case_id"] for it in items}
    assert kind == "segmentation" and ids and not ids & held and ids <= set(sp["pretrain_pool"])
    assert "c8" not in ids  # the datalist's own test section
    # a pool that wrongly holds a held-out case (here: everything) still never yields it
    everything = [{"case_id": f"c{i}"} for i in range(9)]
    _, items = probe_items(seg_datalist, everything, path, max_cases=32)
    assert not {it["case_id"] for it in items} & (held | {"c8"})
    # only cases of the pool, at most max_cases, in a fixed order
    _, two = probe_items(seg_datalist, pool[:3], path, max_cases=2)
    assert len(two) == 2 and {it["case_id"] for it in two} <= {it["case_id"] for it in pool[:3]}


def test_segmentation_probe_is_deterministic_and_centred_on_its_class(seg_datalist: Path) -> None:
    pool = load_pool(seg_datalist)  # training + unlabeled sections: c0..c7
    kind, items = probe_items(seg_datalist, pool, max_cases=4)
    kw = dict(roi_size=[9, 9, 9], normalisation="none", crops_per_class=3)
    a, b = build_probe_set(kind, items, **kw), build_probe_set(kind, items, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.case_ids == b.case_ids
    assert a.images.shape == (4 * 3 * 3, 1, 9, 9, 9) and a.targets.bincount().tolist() == [12, 12, 12]
    assert a.groups.tolist() == [i for i in range(4) for _ in range(9)]
    centre = a.images[:, 0, 4, 4, 4]  # image = label + noise in [0, 0.1)
    assert torch.equal(centre.floor().long(), a.targets)


def _class_datalist(tiny_datalist: Path, tmp_path: Path) -> Path:
    data = json.loads(tiny_datalist.read_text())
    items = [{"image": str(tiny_datalist.parent / it["image"]), "class": i % 2, "case_id": it["case_id"]}
             for i, it in enumerate(data["unlabeled"])]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items[:5], "validation": items[5:]}))
    return dl


def test_classification_probe_one_volume_each_balanced_order(tiny_datalist: Path, tmp_path: Path) -> None:
    dl = _class_datalist(tiny_datalist, tmp_path)
    cfg = toy_config(dl, tmp_path / "x", monitor_every=1, monitor_cases=4, monitor_k=3)
    mon = build_monitor(cfg, load_pool(dl))
    assert mon.describe() == {"kind": "classification", "cases": 4, "samples": 4, "classes": [0, 1]}
    assert "case5" not in mon.probe.case_ids and mon.probe.images.shape == (4, 1, 16, 16, 16)
    assert mon.probe.targets.tolist() in ([0, 1, 0, 1], [1, 0, 1, 0])  # round-robin over the classes
    enc = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool3d(1))
    enc.train()
    rng = torch.get_rng_state()
    s = mon.evaluate(enc)
    assert set(s) == {"monitor/knn_acc", "monitor/knn_balanced_acc", "monitor/seconds"}
    assert all(m.training for m in enc.modules()) and torch.equal(torch.get_rng_state(), rng)
    assert mon.evaluate(enc)["monitor/knn_acc"] == s["monitor/knn_acc"]  # eval mode: dropout off

    class Noisy(torch.nn.Module):  # draws from the global RNG even in eval mode (as random masking does)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4)) + torch.rand(len(x), 1)

    rng = torch.get_rng_state()
    mon.evaluate(Noisy())
    assert torch.equal(torch.get_rng_state(), rng)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_engine_logs_monitor_every_n_steps(seg_datalist: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = toy_config(seg_datalist, tmp_path / "run", total_steps=4, monitor_every=2, experiment="mon",
                     tracking_uri=uri)
    res = run_pretraining(cfg, progress=False)
    lines = _metrics(res.out_dir)
    with_probe = [x["step"] for x in lines if "monitor/knn_acc" in x]
    assert with_probe == [0, 2, 4] and [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [s for s, _ in res.monitor_history] == [0, 2, 4]
    assert all(0.0 <= x["monitor/knn_balanced_acc"] <= 1.0 for x in lines if "monitor/knn_acc" in x)
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(res.run_id, "monitor/knn_acc")] == [0, 2, 4]
    assert client.get_run(res.run_id).data.params["monitor.kind"] == "segmentation"


def test_monitor_keeps_training_and_resume_exact(seg_datalist: Path, tmp_path: Path) -> None:
    common = dict(total_steps=4, checkpoint_every=2, method_kwargs={"dropout": 0.2})
    off = run_pretraining(toy_config(seg_datalist, tmp_path / "off", **common), progress=False)
    on = run_pretraining(toy_config(seg_datalist, tmp_path / "on", monitor_every=1, **common), progress=False)
    assert on.loss_history == off.loss_history and not off.monitor_history  # losses bit-identical
    assert all("monitor/knn_acc" not in x for x in _metrics(off.out_dir))
    a, b = (load_checkpoint(r.last_checkpoint)["model"] for r in (off, on))
    assert all(torch.equal(a[k], b[k]) for k in a)
    half = toy_config(seg_datalist, tmp_path / "half", monitor_every=1, **{**common, "total_steps": 2})
    run_pretraining(half, progress=False)
    resumed = run_pretraining(half.replace(total_steps=4), resume=tmp_path / "half" / "checkpoints" / "last.pt",
                              progress=False)
    assert resumed.loss_history == on.loss_history[2:]
    assert [s for s, _ in resumed.monitor_history] == [3, 4]
    for (_, x), (_, y) in zip(resumed.monitor_history, on.monitor_history[3:], strict=True):
        assert x["monitor/knn_acc"] == y["monitor/knn_acc"]
    assert [x["step"] for x in _metrics(tmp_path / "half") if "monitor/knn_acc" in x] == [0, 1, 2, 3, 4]


def test_monitor_fields_validated_and_outside_the_sweep_identity(tiny_datalist: Path, tmp_path: Path) -> None:
    from medssl.errors import MedsslError

    base = toy_config(tiny_datalist, tmp_path / "x")
    assert pretrain_identity(base) == pretrain_identity(base.replace(monitor_every=100, monitor_k=5))
    with pytest.raises(MedsslError, match="monitor_every must be >= 0"):
        PretrainConfig.from_dict({**base.to_dict(), "monitor_every": -1})
    with pytest.raises(MedsslError, match="monitor_cases must be >= 2"):
        PretrainConfig.from_dict({**base.to_dict(), "monitor_cases": 1})
    # an unlabelled pool: the run goes on without a monitor
    res = run_pretraining(toy_config(tiny_datalist, tmp_path / "u", total_steps=2, monitor_every=1), progress=False)
    assert not res.monitor_history and len(res.loss_history) == 2


def test_probe_on_real_hippocampus(hippocampus_dir: Path, tmp_path: Path) -> None:
    """Real MSD hippocampus: 3 classes at 32³ crop centres, and one evaluation's cost with a tiny encoder."""
    files = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[:4]
    items = [{"image": str(f), "label": str(hippocampus_dir / "labelsTr" / f.name), "case_id": f.name}
             for f in files]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items}))
    from medssl.networks.encoders import build_encoder

    cfg = toy_config(dl, tmp_path / "r", roi_size=[32, 32, 32], monitor_every=1, monitor_cases=4)
    mon = build_monitor(cfg, load_pool(dl))
    assert mon.describe()["classes"] == [0, 1, 2] and mon.describe()["samples"] == 4 * 3 * 2
    enc = build_encoder("segresnet", in_channels=1, img_size=(32, 32, 32), init_filters=8, blocks_down=[1, 1, 1, 1])
    t0 = time.perf_counter()
    s = mon.evaluate(enc)
    assert 0.0 <= s["monitor/knn_acc"] <= 1.0 and time.perf_counter() - t0 < 60


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with Gloo")
def test_monitor_under_ddp_rank0_only_no_hang(seg_datalist: Path, tmp_path: Path) -> None:
    from tests.engines.pretrain.test_ddp import _torchrun, _wait

    det = dict(augment_kwargs={"noise": 0.0}, method_kwargs={"dropout": 0.0})
    cfg = toy_config(seg_datalist, tmp_path / "ddp", total_steps=4, monitor_every=2, batch_size=2, **det)
    cfg.to_yaml(tmp_path / "ddp.yaml")
    _wait(_torchrun(tmp_path / "ddp.yaml", tmp_path / "ddp.log"), tmp_path / "ddp.log")
    lines = _metrics(tmp_path / "ddp")
    assert [x["step"] for x in lines if "monitor/knn_acc" in x] == [0, 2, 4]  # one writer: rank 0
    single = run_pretraining(toy_config(seg_datalist, tmp_path / "one", total_steps=4, monitor_every=2,
                                        batch_size=4, **det),
                             progress=False)
    probes = [x for x in lines if "monitor/knn_acc" in x]
    assert probes[0]["monitor/knn_acc"] == single.monitor_history[0][1]["monitor/knn_acc"]  # same init
    for x, (_, y) in zip(probes[1:], single.monitor_history[1:], strict=True):  # 2 × B/2 = 1 × B up to
        assert x["monitor/knn_acc"] == pytest.approx(y["monitor/knn_acc"], abs=0.05)  # float order: near-ties
