"""bundles/finetune_{seg,cls}/configs/multi_gpu_train.yaml under ``torchrun --nproc_per_node 2`` on CPU (Gloo), with
``python -m monai.bundle run`` on tiny real data: the run finishes, the two ranks hold the same weights after
training (DistributedDataParallel), each rank trained on its half of the cases (DistributedSampler), only rank 0
attached the checkpoint / MLflow handlers, and one MLflow run holds the metrics."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.deploy._finetuned import CLS_NET, adrenal_subset, hippo_data

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / "bundles" / "finetune_seg" / "configs"
CLS = REPO / "bundles" / "finetune_cls" / "configs"
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with Gloo",
)
#: what each rank dumps right after training (before the test evaluator loads the best weights into all ranks)
DUMP = ("$torch.save({'state': @network.module.state_dict(), 'ddp': type(@network).__name__, "
        "'steps_per_epoch': len(@train#dataloader), 'val_handlers': [type(h).__name__ for h in @validate#handlers], "
        "'train_handlers': [type(h).__name__ for h in @train#handlers]}, "
        "@output_dir + '/rank' + str(torch.distributed.get_rank()) + '.pt')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dump_variant(configs: Path, tmp: Path) -> Path:
    """multi_gpu_train.yaml's own ``run`` list with :data:`DUMP` inserted right after ``trainer.run()``."""
    run = yaml.safe_load((configs / "multi_gpu_train.yaml").read_text())["run"]
    at = run.index("$@train#trainer.run()") + 1
    path = tmp / "dump.yaml"
    path.write_text(yaml.safe_dump({"run": run[:at] + [DUMP] + run[at:]}))
    return path


def _torchrun_bundle(configs: list[Path], cwd: Path, timeout: float = 150, **overrides: object) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "monai.bundle", "run",
           "--config_file", str([str(c) for c in configs])]  # fmt: skip
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout[-3000:] + "\n".join(ln for ln in proc.stderr.splitlines() if "Error" in ln)[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, out
    return out


def _check_ranks(out: Path, n_train: int, batch_size: int) -> dict[str, torch.Tensor]:
    r0, r1 = (torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1))
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    # DDP kept the ranks' weights equal (independent training on different shards would not)
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # DistributedSampler: each rank iterated its half of the training cases per epoch
    per_rank = math.ceil(n_train / 2)
    assert r0["steps_per_epoch"] == r1["steps_per_epoch"] == math.ceil(per_rank / batch_size)
    # only rank 0 writes: checkpoint saver, log lines and MLflow are not attached on rank 1
    assert "CheckpointSaver" in r0["val_handlers"] and r1["val_handlers"] == []
    assert "MedsslMLFlowHandler" in r0["train_handlers"]
    assert r1["train_handlers"] == ["LrScheduleHandler", "ValidationHandler"]
    return r0["state"]


def _adrenal_data(medmnist_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """12 real AdrenalMNIST3D volumes (6 training, 3 validation, 3 test; both classes in each) + splits."""
    return adrenal_subset(medmnist_dir, tmp, {"train": (3, 3), "val": (2, 1), "test": (2, 1)}, "multi-gpu-test")


def _one_finished_run(uri: str, metrics: set[str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("medssl-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medssl.source"] == "bundle"
    assert metrics <= set(run.data.metrics)


def test_seg_multi_gpu_train_two_ranks(hippocampus_dir: Path, tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    from medssl.engines.finetune.data import finetune_items

    datalist, splits = hippo_data(hippocampus_dir, tmp_path / "data", n=8)
    n_train = len(finetune_items(datalist, splits, fraction=100, seed=0)["training"])
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlruns.db'}"
    _torchrun_bundle([SEG / "train.yaml", SEG / "multi_gpu_train.yaml", _dump_variant(SEG, tmp_path)], tmp_path,
                     datalist=str(datalist), splits=str(splits), output_dir=str(out), tracking_uri=uri,
                     max_epochs=2, batch_size=1, num_samples=1, roi_size="[16,16,16]", target_spacing="$None",
                     **{"network_def#channels": "[4,8]", "network_def#strides": "[2]",
                        "network_def#num_res_units": 1})
    state = _check_ranks(out, n_train, batch_size=1)
    best = torch.load(out / "checkpoints" / "model.pt", map_location="cpu", weights_only=True)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8], strides=[2], num_res_units=1)
    net.load_state_dict(best)  # rank 0's checkpoint: the unwrapped network's keys (no 'module.' prefix)
    assert best.keys() == state.keys()
    _one_finished_run(uri, {"train_loss", "val_dice_mean", "test_dice_mean"})


def test_cls_multi_gpu_train_two_ranks(medmnist_dir: Path, tmp_path: Path) -> None:
    from medssl.engines.finetune.data import finetune_items

    datalist, splits = _adrenal_data(medmnist_dir, tmp_path / "data")

    n_train = len(finetune_items(datalist, splits, fraction=100, seed=0, task="classification")["training"])
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlruns.db'}"
    _torchrun_bundle([CLS / "train.yaml", CLS / "multi_gpu_train.yaml", _dump_variant(CLS, tmp_path)], tmp_path,
                     datalist=str(datalist), splits=str(splits), output_dir=str(out), tracking_uri=uri,
                     max_epochs=2, batch_size=3, normalisation="none",
                     **{"network_def#network_kwargs": repr(CLS_NET)})
    _check_ranks(out, n_train, batch_size=3)
    assert (out / "checkpoints" / "model.pt").is_file()
    _one_finished_run(uri, {"train_loss", "val_auc", "test_auc"})
