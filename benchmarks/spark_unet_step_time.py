"""Seconds per SparK pretraining step on the MONAI UNet (``monai_unet``) or the SegResNet U-Net, on the CPU.

The model side of one ``medssl pretrain --method spark`` step (mask draw, masked encoder with re-masking, decoder,
loss on masked patches, backward, AdamW step) on random views of the given size, in the memory format the engine
uses on a CPU (``channels_last_3d``, its fp32 CPU default). Data loading is not included: the engine reads cached
volumes and augments the whole batch at once (``benchmarks/pretrain_step.py`` measures that part). Sizes
pipelines/label_efficiency_spark_unet.yaml's ``pretrain.total_steps``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spark_unet_step_time.py --threads 1 --steps 6
    .venv/bin/python benchmarks/spark_unet_step_time.py --threads 2 --steps 6 --minutes 25
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

log = logging.getLogger("spark_unet_step_time")

ENCODERS = {
    "monai_unet": {"channels": [32, 64, 128, 256], "strides": [2, 2, 2], "num_res_units": 2},
    "segresnet_unet": {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]},
}


def main() -> None:
    from medssl.methods import build_method
    from medssl.networks.encoders import build_encoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="monai_unet")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--roi", type=int, nargs=3, default=[40, 56, 40])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 1 warm-up step)")
    p.add_argument("--minutes", type=float, default=25.0, help="budget for the printed total_steps")
    p.add_argument("--no-channels-last", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    enc = build_encoder(a.encoder, in_channels=1, img_size=tuple(a.roi), **ENCODERS[a.encoder])
    method = build_method("spark", enc, mask_ratio=0.6).train()
    fmt = torch.contiguous_format if a.no_channels_last else torch.channels_last_3d
    method = method.to(memory_format=fmt)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(a.batch, 1, *a.roi).contiguous(memory_format=fmt)
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = method({"view1": x})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
        log.info("step %d: %.2f s (loss %.4f)", i, time.perf_counter() - t0, float(loss.detach()))
    med = statistics.median(times)
    out = {
        "encoder": a.encoder, "encoder_kwargs": ENCODERS[a.encoder], "batch": a.batch, "roi": a.roi,
        "threads": a.threads, "channels_last": not a.no_channels_last, "params": sum(p.numel() for p in enc.parameters()),
        "s_per_step_median": round(med, 3), "s_per_step_all": [round(t, 3) for t in times],
        "load_average": os.getloadavg(), "total_steps_for_budget": int(a.minutes * 60 / med),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
