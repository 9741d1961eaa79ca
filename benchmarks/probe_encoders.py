"""Diagnostic: how much of a classification label do frozen SSL encoders carry (linear and kNN probes)?

Answers "is the pretext learning what the downstream task needs?" before any finetuning, on the *validation*
split only (never the test set), so it can explain a study's result without tuning on it (issue 12, item 5:
"if a target is missed, RESULTS.md says what limits it, with the evidence")::

    python benchmarks/probe_encoders.py \
        --datalist studies/adrenal5/runs/sweeps/adrenal-simclr-1500/data/datalist.json \
        --encoder random=resnet3d:studies/adrenal5/runs/sweeps/adrenal-simclr-1500/sweep/pretrain/encoder.pt \
        --encoder simclr-500=studies/adrenal5/runs/sweeps/adrenal5-t0-base/sweep/pretrain/encoder.pt \
        --encoder simclr-1500=studies/adrenal5/runs/sweeps/adrenal-simclr-1500/sweep/pretrain/encoder.pt \
        --normalisation ct --ct-window 0 255 --roi 28 28 28

``NAME=PATH`` loads an encoder file (``encoder.pt``: recipe + weights); ``NAME=random:PATH`` builds the same
recipe with fresh weights (``torch.manual_seed(--seed)``), the floor every pretext must beat.

For each encoder: embeddings ``(N, E)`` of every training and validation volume (whole volume, the pretraining
preprocessing, centre-cropped / padded to ``--roi``; global average of the last feature map); then

- **linear probe**: standardised features, L2 logistic regression (``C`` by 5-fold CV on the training subset),
  fitted on a stratified ``--fractions`` subset of the training split (seeds ``--seeds``), scored on validation:
  AUC, mean ± sd over seeds;
- **kNN probe**: cosine kNN (k = 20, the monitor's weighting) from the same subset onto validation: AUC.

Prints a Markdown table for RESULTS.md and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("probe_encoders")


def load_encoder(spec: str, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``PATH`` or ``random:PATH`` → (encoder in eval mode, the checkpoint's recipe: ``save_encoder`` writes it back
    unchanged, e.g. ``seg_probe.py``'s random-weight U-Net)."""
    from medssl.networks.encoders import rebuild_encoder

    random_init = spec.startswith("random:")
    path = spec.split(":", 1)[1] if random_init else spec
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    torch.manual_seed(seed)
    enc = rebuild_encoder(ckpt["recipe"]["encoder"])
    if not random_init:
        enc.load_state_dict(ckpt["state_dict"])
    return enc.eval(), ckpt["recipe"]


def volumes(items: list[dict[str, Any]], normalisation: str, ct_window: list[float], roi: list[int]) -> torch.Tensor:
    """``(N, 1, D, H, W)`` float32: the pretraining preprocessing, centre-cropped / zero-padded to ``roi``."""
    from monai.transforms import ResizeWithPadOrCrop

    from medssl.engines.pretrain.data import preprocessing

    chain, fit = preprocessing(normalisation, None, ct_window), ResizeWithPadOrCrop(roi)
    return torch.stack([torch.as_tensor(fit(chain({"image": it["image"]})["image"])) for it in items]).float()


def knn_auc(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int = 20) -> float:
    """AUC of the class-1 vote share of a cosine kNN with ``exp(sim / 0.07)`` weights (the monitor's)."""
    from sklearn.metrics import roc_auc_score

    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = b @ a.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, axis=1) / 0.07)
    score = (w * (y_train[idx] == 1)).sum(1) / w.sum(1)
    return float(roc_auc_score(y_test, score))


def linear_auc(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y_train).min()))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=folds, max_iter=2000, random_state=seed))
    with warnings.catch_warnings():  # scikit-learn 1.9 announces default changes; these defaults are the ones used
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(train, y_train)
    return float(roc_auc_score(y_test, clf.predict_proba(test)[:, 1]))


def subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified indices: ``fraction`` of each class (at least 2 per class)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out.append(rng.choice(idx, max(2, round(fraction * len(idx))), replace=False))
    return np.sort(np.concatenate(out))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--encoder", action="append", required=True, help="NAME=PATH or NAME=random:PATH")
    p.add_argument("--normalisation", default="ct")
    p.add_argument("--ct-window", type=float, nargs=2, default=[0.0, 255.0])
    p.add_argument("--roi", type=int, nargs=3, default=[28, 28, 28])
    p.add_argument("--fractions", type=float, nargs="+", default=[10.0, 100.0], help="percent of training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--class-key", default="class")
    p.add_argument("--out", type=Path, default=Path("probe_encoders.json"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from medssl.engines.pretrain.monitor import embed

    dl = json.loads(a.datalist.read_text())
    root = a.datalist.parent
    fix = lambda it: it | {"image": str(root / it["image"]) if not Path(it["image"]).is_absolute() else it["image"]}  # noqa: E731
    tr, va = [fix(i) for i in dl["training"]], [fix(i) for i in dl["validation"]]
    y_tr = np.array([int(i[a.class_key]) for i in tr])
    y_va = np.array([int(i[a.class_key]) for i in va])
    x_tr, x_va = (volumes(s, a.normalisation, a.ct_window, a.roi) for s in (tr, va))
    log.info("training %d (class 1: %d), validation %d (class 1: %d)", len(tr), y_tr.sum(), len(va), y_va.sum())
    results: dict[str, Any] = {"datalist": str(a.datalist), "n_train": len(tr), "n_val": len(va), "encoders": {}}
    for spec in a.encoder:
        name, path = spec.split("=", 1)
        enc, _ = load_encoder(path, seed=0)
        e_tr, e_va = (embed(enc, x).numpy() for x in (x_tr, x_va))
        row: dict[str, Any] = {"path": path, "dim": int(e_tr.shape[1])}
        for f in a.fractions:
            lin, knn = [], []
            for s in a.seeds:
                idx = subset(y_tr, f / 100, s) if f < 100 else np.arange(len(y_tr))
                lin.append(linear_auc(e_tr[idx], y_tr[idx], e_va, y_va, s))
                knn.append(knn_auc(e_tr[idx], y_tr[idx], e_va, y_va))
                if f >= 100:
                    break  # every seed sees the same cases
            row[f"f{f:g}"] = {"linear_auc": lin, "knn_auc": knn}
        results["encoders"][name] = row
        log.info("%s: %s", name, {k: v for k, v in row.items() if k.startswith("f")})
    a.out.write_text(json.dumps(results, indent=1))
    print("| encoder | " + " | ".join(f"{f:g} %: linear / kNN val AUC" for f in a.fractions) + " |")
    print("| --- |" + " --- |" * len(a.fractions))
    for name, row in results["encoders"].items():
        cells = []
        for f in a.fractions:
            r = row[f"f{f:g}"]
            fmt = lambda v: f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else "")  # noqa: E731
            cells.append(f"{fmt(r['linear_auc'])} / {fmt(r['knn_auc'])}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
