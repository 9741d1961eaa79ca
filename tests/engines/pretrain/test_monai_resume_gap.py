"""Why medssl keeps its own pretraining loop (issue 11): what MONAI's engines lose on a mid-epoch resume.

The same tiny SSL training (SimCLR on a SegResNet-8 encoder, 6 real hippocampus MRI volumes, batch 2 = 3
iterations per epoch, 16³ views, 6 steps) is interrupted after step 4 (the middle of epoch 2) and resumed:

(a) MONAI's way, as documented: ``SupervisedTrainer`` (with a custom ``iteration_update`` for the SSL step),
    a ``monai.data.DataLoader`` whose random transforms make the two views (as in MONAI's self-supervised
    tutorial: ``CopyItemsd`` + one random chain per view), a sampler whose order is a pure function of
    ``(seed, epoch)`` (``DistributedSampler``, whose epoch MONAI's ``Workflow`` sets: MONAI's best case),
    ``CheckpointSaver`` every iteration and ``CheckpointLoader`` with the trainer, network, optimizer and lr
    scheduler in ``load_dict`` in a fresh trainer (fresh process: ``set_determinism`` again).
(b) medssl's :func:`~medssl.engines.pretrain.engine.run_pretraining`, stopped after step 4 by the preemption
    path (what SLURM's pre-timeout signal triggers) and resumed from its ``last.pt``.

Inspected, not guessed: MONAI restores weights, optimizer, lr schedule and the iteration count, but loses
(1) the data position within the epoch -- Ignite's ``Engine`` opens a fresh iterator over the epoch's order
and only shortens the epoch, so the resumed steps re-read the epoch's first batches (one batch is trained on
twice, another never) -- and (2) the random transforms' RNG state -- the new ``DataLoader`` re-seeds them, so
the resumed views repeat the draws of the run's first steps. Either alone breaks exactness: the RNG state added
to the checkpoint by hand makes an epoch-boundary resume exact, but not a mid-epoch one. medssl's checkpoint
holds both (``CropBatcher`` position, augmentation + RNG states): its resumed losses equal the straight run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import (
    Compose,
    CopyItemsd,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import set_determinism
from torch.utils.data import DistributedSampler

from medssl.config import PretrainConfig
from medssl.engines.pretrain.components import build_components, param_groups
from medssl.engines.pretrain.data import preprocessing
from medssl.engines.pretrain.engine import run_pretraining
from medssl.engines.pretrain.pool import load_pool
from medssl.engines.runtime.checkpoint import load_checkpoint
from medssl.engines.runtime.preemption import Preempted, PreemptionHandler

SEED, BATCH, STEPS, STOP, ROI = 0, 2, 6, 4, (16, 16, 16)  # 6 volumes / batch 2 → 3 steps per epoch
LR, WARMUP = 1e-3, 2


@pytest.fixture(scope="module")
def hippo_datalist(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real hippocampus MRI volumes (about 35 x 50 x 35 voxels) as an ``unlabeled`` datalist."""
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii*"))[:6]
    path = tmp_path_factory.mktemp("hippo") / "datalist.json"
    path.write_text(json.dumps({"unlabeled": [{"image": str(f), "case_id": f.name.split(".")[0]} for f in files]}))
    return path


def _config(datalist: Path, out: Path) -> PretrainConfig:
    """SimCLR on a SegResNet-8 encoder, 16³ views, batch 2, 6 steps on the CPU, no MLflow."""
    return PretrainConfig(
        datalist=str(datalist), method="simclr", encoder="segresnet", roi_size=list(ROI),
        encoder_kwargs={"init_filters": 8, "blocks_down": [1, 1, 1, 1]},
        method_kwargs={"hidden_dim": 64, "out_dim": 32}, batch_size=BATCH, total_steps=STEPS, lr=LR,
        warmup_steps=WARMUP, device="cpu", deterministic=True, out_dir=str(out), experiment=None, preview=False,
        seed=SEED,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- (a) MONAI
class _TransformRNG:
    """The random transforms' ``R`` states as a checkpointable object (``state_dict`` / ``load_state_dict``):
    what a MONAI user would have to add by hand; MONAI's transforms have no state dict of their own.

    A dictionary transform may draw from an inner array transform's ``R`` (``RandSpatialCropd`` draws the crop
    from its ``cropper``, ``RandScaleIntensityd`` the factor from its ``scaler``), so every ``Randomizable``
    reachable through attributes is collected, as ``monai.data.utils.set_rnd`` seeds them."""

    def __init__(self, transforms: list[Any]) -> None:
        self.transforms: list[Randomizable] = []

        def walk(obj: Any) -> None:
            if isinstance(obj, Randomizable) and all(obj is not t for t in self.transforms):
                self.transforms.append(obj)
                for value in vars(obj).values():
                    walk(value)

        for t in transforms:
            walk(t)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only: ``CheckpointLoader`` reads with ``torch.load(weights_only=True)``."""
        states = [t.R.get_state() for t in self.transforms]  # ("MT19937", keys (624,) uint32, pos, gauss…)
        return {str(i): [torch.from_numpy(s[1].astype(np.int64)), *s[2:]] for i, s in enumerate(states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, t in enumerate(self.transforms):
            keys, *rest = state[str(i)]
            t.R.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))

    def fingerprint(self) -> str:
        """A short hash of every transform's RNG state (equal hashes = equal states)."""
        h = hashlib.sha256()
        for t in self.transforms:
            _, keys, pos, *_ = t.R.get_state()
            h.update(keys.tobytes() + int(pos).to_bytes(4, "little"))
        return h.hexdigest()[:16]


class MonaiSSLRun:
    """One MONAI ``SupervisedTrainer`` run of the SSL step, recording per iteration the batch's case ids, the
    transforms' RNG fingerprint (before the batch is drawn), the loss and the lr, and the weights before the
    first step run and after step ``STOP``.

    Args:
        datalist: the pool's datalist.
        ckpt_dir: ``CheckpointSaver`` folder (every iteration, all kept).
        resume_from: a ``checkpoint_iteration=N.pt`` to load with ``CheckpointLoader`` (fresh trainer).
        restore_rng: also put the transforms' RNG states in ``load_dict`` (hand-written, not MONAI's way).
    """

    def __init__(self, datalist: Path, ckpt_dir: Path, resume_from: Path | None = None, restore_rng: bool = False):
        set_determinism(SEED)  # what the top of a (re)started training script does
        cfg = _config(datalist, ckpt_dir)
        _, self.method, _ = build_components(cfg)  # the same encoder + SimCLR as medssl's run (same init)
        views = [
            SpatialPadd(keys="image", spatial_size=ROI),
            CopyItemsd(keys="image", times=1, names="view2"),
            RandSpatialCropd(keys="image", roi_size=ROI, random_size=False),
            RandSpatialCropd(keys="view2", roi_size=ROI, random_size=False),
            RandFlipd(keys=["image", "view2"], prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.2, prob=1.0),
            RandScaleIntensityd(keys="view2", factors=0.2, prob=1.0),
        ]
        pool = load_pool(datalist)
        dataset = CacheDataset(pool, Compose([*preprocessing("robust").transforms, *views]), progress=False)
        self.rng = _TransformRNG(views)
        # the one torch sampler whose order is a pure function of (seed, epoch); MONAI's Workflow sets its epoch
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=0)
        optimizer = torch.optim.AdamW(param_groups(self.method, cfg.weight_decay), lr=LR)  # medssl's default
        scheduler = WarmupCosineSchedule(optimizer, warmup_steps=WARMUP, t_total=STEPS)
        self.records: list[dict[str, Any]] = []
        self.weights_at_stop: dict[str, torch.Tensor] | None = None  # after step STOP
        self.weights_at_start: dict[str, torch.Tensor] | None = None  # before the first step run here
        self.trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=STEPS // (len(pool) // BATCH), train_data_loader=loader,
            network=self.method, optimizer=optimizer, loss_function=None, iteration_update=self._iteration,
            decollate=False,
        )  # fmt: skip
        save = {"trainer": self.trainer, "network": self.method, "optimizer": optimizer, "lr_scheduler": scheduler}
        handlers: list[Any] = [LrScheduleHandler(scheduler, epoch_level=False, print_lr=False)]
        if resume_from is not None:
            load = save | ({"transform_rng": self.rng} if restore_rng else {})
            handlers.insert(0, CheckpointLoader(load_path=str(resume_from), load_dict=load))
        else:
            handlers.append(CheckpointSaver(str(ckpt_dir), save | {"transform_rng": self.rng}, epoch_level=False,
                                            save_interval=1, n_saved=None))  # fmt: skip
        for h in handlers:
            h.attach(self.trainer)
        self.trainer.add_event_handler(Events.GET_BATCH_STARTED, self._before_batch)
        self._rng_before = ""

    def _before_batch(self, engine: SupervisedTrainer) -> None:
        self._rng_before = self.rng.fingerprint()  # the transforms' RNG before they draw this batch

    def _iteration(self, engine: SupervisedTrainer, batch: dict[str, Any]) -> dict[str, float]:
        """The SSL step in MONAI's ``iteration_update`` slot: two views → SimCLR loss → AdamW step."""
        if self.weights_at_start is None:
            self.weights_at_start = {k: v.detach().clone() for k, v in engine.network.state_dict().items()}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        out = engine.network({"view1": batch["image"].as_tensor(), "view2": batch["view2"].as_tensor()})
        out["loss"].backward()
        lr = engine.optimizer.param_groups[0]["lr"]
        engine.optimizer.step()
        loss = float(out["loss"].detach())
        self.records.append({"iteration": engine.state.iteration, "cases": list(batch["case_id"]), "loss": loss,
                             "lr": lr, "rng": self._rng_before})  # fmt: skip
        if engine.state.iteration == STOP:
            self.weights_at_stop = {k: v.detach().clone() for k, v in engine.network.state_dict().items()}
        return {"loss": loss}

    def run(self) -> MonaiSSLRun:
        self.trainer.run()
        return self

    def by_iteration(self, key: str) -> dict[int, Any]:
        return {r["iteration"]: r[key] for r in self.records}


def test_monai_checkpoint_loader_loses_the_mid_epoch_position_and_the_transform_rng(
    hippo_datalist: Path, tmp_path: Path
) -> None:
    """MONAI resumes weights, optimizer, lr schedule and iteration count, but not the position in the epoch
    nor the random transforms' RNG, so its resumed losses differ from the straight run's."""
    straight = MonaiSSLRun(hippo_datalist, tmp_path / "monai").run()
    epoch = len(load_pool(hippo_datalist)) // BATCH
    assert [r["iteration"] for r in straight.records] == list(range(1, STEPS + 1)) and STOP % epoch != 0
    ckpt = tmp_path / "monai" / f"checkpoint_iteration={STOP}.pt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "monai").iterdir())

    resumed = MonaiSSLRun(hippo_datalist, tmp_path / "monai_resumed", resume_from=ckpt).run()
    tail = list(range(STOP + 1, STEPS + 1))
    assert [r["iteration"] for r in resumed.records] == tail  # iteration count restored: it runs steps 5, 6
    # CheckpointLoader (at STARTED) restored the weights of step STOP
    assert all(torch.equal(resumed.weights_at_start[k], v) for k, v in straight.weights_at_stop.items())
    s_lr, r_lr = straight.by_iteration("lr"), resumed.by_iteration("lr")
    assert [r_lr[i] for i in tail] == [s_lr[i] for i in tail]  # lr schedule restored

    # (1) data position: the epoch's order is restored (seed, epoch) but the resumed epoch re-reads its first
    # batches: step 5 trains on step 4's cases again, and step 6's cases are never seen in this epoch
    s_cases, r_cases = straight.by_iteration("cases"), resumed.by_iteration("cases")
    assert [r_cases[i] for i in tail] == [s_cases[i] for i in range(STOP, STEPS)]
    assert [r_cases[i] for i in tail] != [s_cases[i] for i in tail]
    # (2) transform RNG: the fresh DataLoader re-seeded the transforms, so the resumed run draws its first views
    # from the state the run started with (step 1's), not the one the straight run had before step 5
    s_rng, r_rng = straight.by_iteration("rng"), resumed.by_iteration("rng")
    assert r_rng[STOP + 1] == s_rng[1] != s_rng[STOP + 1]
    s_loss, r_loss = straight.by_iteration("loss"), resumed.by_iteration("loss")
    assert all(r_loss[i] != s_loss[i] for i in tail), (s_loss, r_loss)

    # either loss alone breaks exactness. At the epoch boundary (step 3) the position is right; there MONAI's
    # resume is still inexact (the views differ) but exact once the transforms' RNG is put back by hand, so
    # nothing else is missing ...
    at_boundary = tmp_path / "monai" / f"checkpoint_iteration={epoch}.pt"
    after = {i: s_loss[i] for i in range(epoch + 1, STEPS + 1)}
    plain = MonaiSSLRun(hippo_datalist, tmp_path / "b0", at_boundary).run()
    assert plain.by_iteration("cases") == {i: s_cases[i] for i in after}
    assert all(plain.by_iteration("loss")[i] != s_loss[i] for i in after)
    assert MonaiSSLRun(hippo_datalist, tmp_path / "b1", at_boundary, restore_rng=True).run().by_iteration("loss") == after
    # ... but in the middle of the epoch the RNG put back does not help: the data position is still lost
    mid = MonaiSSLRun(hippo_datalist, tmp_path / "m", ckpt, restore_rng=True).run()
    assert mid.by_iteration("cases") == r_cases and all(mid.by_iteration("loss")[i] != s_loss[i] for i in tail)


# ------------------------------------------------------------------------------------------- (b) medssl
class _SignalAfter(PreemptionHandler):
    """SLURM's pre-timeout signal, arriving during step ``n`` (the engine asks once per finished step)."""

    def __init__(self, n: int) -> None:
        super().__init__(signals=())  # nothing trapped: the flag is set here instead of by a real signal
        self.n, self.asked = n, 0

    def should_stop(self, any_rank: Any = None) -> bool:
        self.asked += 1
        if self.asked >= self.n:
            self.signum = 10  # SIGUSR1
        return super().should_stop(any_rank)


def test_medssl_resumes_mid_epoch_exactly(hippo_datalist: Path, tmp_path: Path) -> None:
    straight = run_pretraining(_config(hippo_datalist, tmp_path / "straight"), progress=False)
    cfg = _config(hippo_datalist, tmp_path / "interrupted")
    with pytest.raises(Preempted) as stop:
        run_pretraining(cfg, progress=False, preemption=_SignalAfter(STOP))
    assert stop.value.step == STOP
    data = load_checkpoint(stop.value.checkpoint)["data"]  # the position inside epoch 2 (0-based 1) is saved
    assert (data["epoch"], data["position"]) == (1, (STOP * BATCH) % len(load_pool(hippo_datalist)))
    resumed = run_pretraining(cfg, resume="auto", progress=False)
    assert [s for s, _ in resumed.loss_history] == list(range(STOP + 1, STEPS + 1))
    assert resumed.loss_history == straight.loss_history[STOP:]  # bit-for-bit, not within a tolerance
    assert np.isfinite([v for _, v in straight.loss_history]).all()
