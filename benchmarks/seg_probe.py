"""Diagnostic: do frozen SSL U-Net features carry the segmentation? (issue 12, item 5: evidence for a missed target)

The segmentation counterpart of ``probe_encoders.py``. For each pretrained U-Net (encoder *and* decoder, as SparK
pretrains them) and a random-weight U-Net of the same recipe, finetune **only the new output layer** (the whole
pretrained part frozen for every step: ``ssl_schedule = {freeze_steps: max_steps, warmup_steps: 0}``) on one
label fraction of a study's run config, and report the best *validation* Dice (the study's selection split; the
run's own test pass is not looked at). The gap between the two rows is what the pretext learned that a
segmentation head can use; a full finetune from scratch is the ceiling::

    OMP_NUM_THREADS=1 python benchmarks/seg_probe.py \
        --config studies/runs/sweeps/hippocampus-label-efficiency-spark-unet/sweep/f5-ssl-s0/config.yaml \
        --encoder spark=studies/runs/sweeps/hippocampus-label-efficiency-spark-unet/sweep/pretrain/encoder.pt \
        --encoder random=random:studies/runs/sweeps/hippocampus-label-efficiency-spark-unet/sweep/pretrain/encoder.pt \
        --steps 600 --out /tmp/seg_probe

``NAME=PATH`` is an ``encoder.pt``; ``NAME=random:PATH`` writes ``OUT/NAME/encoder.pt`` with the same recipe and
fresh weights (``torch.manual_seed(--seed)``) first. Each run is an ordinary ``medssl finetune`` run folder
``OUT/NAME`` tracked in ``OUT/mlruns.db`` (not the study's store). Prints a Markdown table and writes
``OUT/seg_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("seg_probe")

#: run-config fields that tie a run to its study (parent run, tags, sweep key): dropped, the probe is its own run
_STUDY_FIELDS = ("study", "parent_run_id", "tags", "run_name", "tracking_uri", "experiment", "out_dir", "init")


def random_encoder(path: Path, out: Path, seed: int) -> Path:
    """``out/encoder.pt``: ``path``'s recipe with fresh weights (seeded), the floor a pretext must beat."""
    from probe_encoders import load_encoder  # benchmarks/ is on sys.path when this runs as a script

    from medssl.engines.runtime.checkpoint import save_encoder

    enc, recipe = load_encoder(f"random:{path}", seed)
    return save_encoder(out, enc, recipe)[0]


def probe_config(base: dict[str, Any], encoder: Path, out: Path, name: str, steps: int, val_every: int) -> Any:
    """The run config of one probe: ``base`` with the SSL init ``encoder``, frozen for all ``steps``."""
    from medssl.engines.finetune import FinetuneConfig

    cfg = {k: v for k, v in base.items() if k not in _STUDY_FIELDS}
    cfg |= {
        "init": f"ssl:{encoder}",
        "ssl_schedule": {"freeze_steps": steps, "warmup_steps": 0, "encoder_lr_scale": 1.0, "llrd": None},
        "max_steps": steps,
        "val_every_steps": val_every,
        "early_stopping_patience": 0,
        "out_dir": str(out / name),
        "run_name": f"seg-probe/{name}",
        "experiment": "medssl-seg-probe",
        "tracking_uri": f"sqlite:///{(out / 'mlruns.db').resolve()}",
    }
    return FinetuneConfig.from_dict(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a segmentation run's config.yaml (fraction, seed, recipe)")
    p.add_argument("--encoder", action="append", required=True, help="NAME=PATH or NAME=random:PATH")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of the output layer")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight encoders")
    p.add_argument("--out", type=Path, default=Path("seg_probe"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from medssl.engines.finetune import run_finetune

    base = yaml.safe_load(a.config.read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": str(a.config), "fraction": base.get("fraction"), "seed": base.get("seed"),
                               "steps": a.steps, "probes": {}}
    for spec in a.encoder:
        name, path = spec.split("=", 1)
        enc = random_encoder(Path(path.split(":", 1)[1]), a.out / name, a.seed) if path.startswith("random:") else Path(path)
        res = run_finetune(probe_config(base, enc, a.out, name, a.steps, a.val_every), progress=False)
        row = {"encoder": path, "best_val": res.best_val, "best_epoch": res.best_epoch, "run_id": res.run_id,
               "transferred": {k: (res.transfer or {}).get(k) for k in ("share", "n_matched", "n_matched_decoder")}}
        results["probes"][name] = row
        log.info("%s: best validation %s", name, res.best_val)
    (a.out / "seg_probe.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nFrozen U-Net, output layer trained {a.steps} steps, fraction {results['fraction']} %, seed {results['seed']}")
    print("| encoder | val Dice mean | Dice 1 | Dice 2 |\n|---|---|---|---|")
    for name, row in results["probes"].items():
        v = row["best_val"]
        print(f"| {name} | {v.get('dice_mean', float('nan')):.4f} | {v.get('dice_1', float('nan')):.4f} | {v.get('dice_2', float('nan')):.4f} |")
    return results


if __name__ == "__main__":
    main()
