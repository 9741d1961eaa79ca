"""Self-training (semi-supervised): a finetuned *teacher* labels the seed's unlabeled volumes, and the run (the
*student*) trains on its few true labels plus those pseudo-labels.

The classic recipe (Lee, "Pseudo-Label", ICML-W 2013; Xie et al., "Self-training with Noisy Student improves
ImageNet classification", CVPR 2020; for 3D medical segmentation e.g. Bai et al., "Semi-supervised learning for
network-based cardiac MR image segmentation", MICCAI 2017): the student sees many more volumes than were labelled,
with the augmentation as the "noise", and is validated, selected and tested exactly as any run (true labels
only). It uses the unlabeled pool that SSL pretraining uses, so it complements an SSL init (teacher and student
may both start from the pretrained encoder).

Config (``FinetuneConfig.self_training``)::

    self_training:
      teacher: runs/f5-scratch-s0/checkpoints/best.pt   # a finetune checkpoint, run folder, runs:/ or models:/ URI
      pool: seed            # "seed": splits["unlabeled"][seed] (outside test ∪ this seed's validation);
                            # "study": splits["pretrain_pool"] (outside test ∪ every seed's validation)
      labelled_share: 0.5   # share of the training items that are truly labelled (true cases repeated)
      tta: true             # the teacher predicts with test-time flips (along the axes it was trained to flip)
      copy_paste: 0.0       # probability that a (true, pseudo) pair of a batch swaps a box (BCP, CVPR 2023;
                            # medssl.engines.finetune.mix); 0 (default) = off, and then absent from the config

What it guarantees (each refused with a :class:`~medssl.errors.MedsslError` naming the case and the file):

- no pool case is in this run's validation or test set, and the run's own labelled cases are not relabelled;
- the teacher never saw the run's test cases (neither trained nor selected on them) and never trained on the
  run's validation cases (its checkpoint's config is resolved to its cases);
- the pool volumes' own label files, if the datalist has any, are never read;
- the pseudo-labels are written once to ``<out_dir>/pseudo_labels/`` (``<case>_seg.nii.gz`` on each volume's own
  grid, by :func:`medssl.deploy.predict.predict`) with ``manifest.json`` (teacher sha256, pool, tta); a resumed
  run reuses them, so resume stays exact, and labels of another teacher, pool or tta setting are refused, never
  silently replaced; a volume the teacher cannot read is reported and left out (the others are used).

Mixing: with ``L`` labelled and ``P`` pseudo-labelled cases the labelled ones are repeated ``r = max(1,
round(share · P / ((1 − share) · L)))`` times in the epoch (indices into one cached dataset, no copy), e.g. 7
labelled, 133 pseudo, share 0.5 → r = 19 (133 true of 266 items per epoch).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["POOLS", "DEFAULTS", "OPTIONAL", "PSEUDO_PREFIX", "normalise_self_training", "pool_ids", "labelled_repeats",
           "PseudoLabels", "time_teacher"]

log = logging.getLogger(__name__)

POOLS = ("seed", "study")
DEFAULTS: dict[str, Any] = {"teacher": None, "pool": "seed", "labelled_share": 0.5, "tta": True}
#: keys added after studies ran: kept only when they differ from these values, so an existing student's config
#: (and its ``medssl.config_hash``) is unchanged
OPTIONAL: dict[str, Any] = {"copy_paste": 0.0}
MANIFEST = "manifest.json"
#: case ids of pseudo-labelled training items: ``"pseudo:<pool case id>"`` (never a datalist case id)
PSEUDO_PREFIX = "pseudo:"


def normalise_self_training(value: Any) -> dict[str, Any] | None:
    """``None`` / ``{}`` → ``None`` (off); a string → ``{"teacher": value}``; a mapping → every key of
    :data:`DEFAULTS` filled, and the keys of :data:`OPTIONAL` kept only when they differ from their default.

    Raises:
        ValueError: an unknown key, no teacher, a pool not in :data:`POOLS`, ``labelled_share`` outside (0, 1),
            ``copy_paste`` outside [0, 1].
    """
    if value is None or value == {}:
        return None
    if isinstance(value, str):
        value = {"teacher": value}
    if not isinstance(value, dict):
        raise ValueError(f"self_training must be a mapping or a teacher path, got {value!r}")
    unknown = sorted(set(value) - set(DEFAULTS) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"self_training: unknown key(s) {unknown} (known: {sorted(DEFAULTS | OPTIONAL)})")
    out = DEFAULTS | dict(value)
    if not out["teacher"] or not isinstance(out["teacher"], str):
        raise ValueError("self_training.teacher must name a finetune checkpoint, run folder or MLflow URI")
    if out["pool"] not in POOLS:
        raise ValueError(f"self_training.pool must be one of {POOLS}, got {out['pool']!r}")
    share = float(out["labelled_share"])
    if not 0.0 < share < 1.0:
        raise ValueError(f"self_training.labelled_share must be in (0, 1), got {out['labelled_share']!r}")
    out["labelled_share"], out["tta"] = share, bool(out["tta"])
    if "copy_paste" in out:
        try:
            cp = float(out["copy_paste"])
        except (TypeError, ValueError):
            cp = -1.0
        if not 0.0 <= cp <= 1.0:
            raise ValueError(f"self_training.copy_paste must be a probability in [0, 1], got {out['copy_paste']!r}")
        out["copy_paste"] = cp
        if cp == OPTIONAL["copy_paste"]:
            del out["copy_paste"]
    return out


def pool_ids(splits: dict[str, Any], seed: int, pool: str, exclude: Sequence[str]) -> list[str]:
    """Case ids to pseudo-label: the seed's unlabeled pool (``"seed"``) or the study-wide pretraining pool
    (``"study"``) of a loaded ``splits.json``, minus ``exclude`` (the run's labelled cases), sorted.

    Raises:
        MedsslError: the splits have no such pool for the seed.
    """
    if pool == "seed":
        ids = splits.get("unlabeled", {}).get(str(seed))
    else:
        ids = splits.get("pretrain_pool")
    if ids is None:
        raise MedsslError(f"self_training.pool={pool!r}: the splits hold no such pool for seed {seed}")
    drop = set(exclude)
    return sorted(c for c in ids if c not in drop)


def labelled_repeats(n_labelled: int, n_pseudo: int, share: float) -> int:
    """How often each labelled case appears per epoch so that about ``share`` of the items are truly labelled.

    Example: ``labelled_repeats(7, 133, 0.5) == 19``; no pseudo case → 1.
    """
    if n_labelled < 1 or n_pseudo < 1:
        return 1
    return max(1, round(share * n_pseudo / ((1.0 - share) * n_labelled)))


def _teacher_cases(config: dict[str, Any], source: str) -> tuple[set[str], set[str], set[str]]:
    """(training, validation, test) case ids of the teacher's own run, from its checkpoint's config."""
    from medssl.engines.finetune.data import finetune_items

    try:
        items = finetune_items(
            config["datalist"], config["splits"], fraction=float(config["fraction"]), seed=int(config["seed"]),
            task="segmentation",
        )
    except (KeyError, TypeError, MedsslError) as e:
        raise MedsslError(
            f"self_training teacher {source}: cannot resolve the cases it was trained on from its config "
            f"({type(e).__name__}: {e}); the leakage check needs its datalist and splits"
        ) from e
    return tuple({it["case_id"] for it in items[r]} for r in ("training", "validation", "test"))  # type: ignore[return-value]


def _stage_pool(images: dict[str, str], stage: Path) -> None:
    """Links ``<stage>/<case id>.nii(.gz)`` to the pool images, so the teacher's outputs are named by case id (files
    of different folders may share a name)."""
    stage.mkdir(parents=True, exist_ok=True)
    for c, image in images.items():
        os.symlink(image, stage / (c + (".nii.gz" if image.endswith(".nii.gz") else ".nii")))


def _teacher_and_pool(spec: dict[str, Any], *, datalist: str | Path, splits: str | Path, seed: int,
                      items: dict[str, list[dict[str, Any]]], out_channels: int,
                      tmp: str) -> tuple[Path, str, list[str], dict[str, str]]:
    """Every check of :class:`PseudoLabels` before labelling: the pool (never a held-out case, not empty), the
    teacher (task, classes, the cases it saw) and the pool images. Returns ``(teacher checkpoint path (under
    tmp when it came from MLflow), its sha256, pool case ids, {case id: image path})``."""
    from medssl.data.splits import load_splits
    from medssl.deploy.model import load_finetune_checkpoint, resolve_source
    from medssl.engines.finetune.identity import file_sha256

    teacher = str(spec["teacher"])
    sp = load_splits(splits)
    labelled = [it["case_id"] for it in items["training"]]
    ids = pool_ids(sp, seed, spec["pool"], labelled)
    held = {it["case_id"]: role for role in ("validation", "test") for it in items[role]}
    leaked = [c for c in ids if c in held]
    if leaked:
        raise MedsslError(
            f"self_training: pool case(s) {leaked[:3]} of {splits} are in this run's "
            f"{held[leaked[0]]} set; pseudo-labels must never come from held-out cases"
        )
    if not ids:
        raise MedsslError(f"self_training: the {spec['pool']!r} pool of seed {seed} in {splits} holds no "
                          "unlabelled case outside the run's training cases")
    path = resolve_source(teacher, tmp)
    ckpt = load_finetune_checkpoint(path, source=teacher)
    PseudoLabels._check_teacher(ckpt, teacher, items, int(out_channels))
    return path, file_sha256(path), ids, PseudoLabels._pool_images(ids, Path(datalist))


def time_teacher(spec: dict[str, Any], *, datalist: str | Path, splits: str | Path, seed: int,
                 items: dict[str, list[dict[str, Any]]], out_channels: int, device: str = "cpu",
                 cases: int = 1) -> dict[str, Any]:
    """What labelling a run's pool will cost, without labelling it: :class:`PseudoLabels`' checks, then the teacher
    predicts the first ``cases`` pool volumes into a temporary folder (with the run's ``tta`` setting).

    Returns:
        ``{"pool": pool cases, "timed": volumes predicted, "s_per_case": seconds per volume (model load included)}``.

    Raises:
        MedsslError: as :class:`PseudoLabels` (a held-out or empty pool, an unfit teacher, a pool image that is not
            one NIfTI file).
    """
    import time

    from medssl.deploy.predict import predict

    with tempfile.TemporaryDirectory(prefix="medssl_teacher_") as tmp:
        path, _, ids, images = _teacher_and_pool(spec, datalist=datalist, splits=splits, seed=seed, items=items,
                                                 out_channels=out_channels, tmp=tmp)
        stage = Path(tmp) / "stage"
        timed = ids[: max(1, int(cases))]
        _stage_pool({c: images[c] for c in timed}, stage)
        t0 = time.perf_counter()
        predict(path, [stage], Path(tmp) / "out", device=device, tta=spec["tta"])
        elapsed = time.perf_counter() - t0
    return {"pool": len(ids), "timed": len(timed), "s_per_case": elapsed / len(timed)}


class PseudoLabels:
    """The teacher's labels for one run's pool, made (or reused) at construction.

    Args:
        spec: the normalised ``self_training`` mapping (:func:`normalise_self_training`).
        datalist: the run's datalist (pool images are looked up by case id; relative paths against its folder).
        splits: the run's ``splits.json``.
        seed: the run's split seed.
        items: the run's ``{"training", "validation", "test"}`` items (:func:`~medssl.engines.finetune.data.finetune_items`).
        out_channels: the run's classes incl. background (the teacher's must match).
        out_dir: the run folder (labels go to ``<out_dir>/pseudo_labels``).
        device: where the teacher runs.

    Attributes:
        items: the pseudo-labelled training items ``{"image", "label": <pseudo file>, "case_id": "pseudo:<id>"}``.
        report: ``{"teacher", "teacher_sha256", "pool", "cases", "failed", "reused", "tta"}`` (recorded in the recipe).

    Raises:
        MedsslError: a pool case in the run's validation/test set, a teacher that saw the run's test cases or
            trained on its validation cases, a teacher of another task or class count, an empty pool, or a pool
            case whose image is not one NIfTI file.
    """

    def __init__(self, spec: dict[str, Any], *, datalist: str | Path, splits: str | Path, seed: int,
                 items: dict[str, list[dict[str, Any]]], out_channels: int, out_dir: str | Path,
                 device: str = "cpu") -> None:
        self.spec, self.folder = spec, Path(out_dir) / "pseudo_labels"
        teacher = str(spec["teacher"])
        with tempfile.TemporaryDirectory(prefix="medssl_teacher_") as tmp:
            path, sha, ids, images = _teacher_and_pool(spec, datalist=datalist, splits=splits, seed=seed, items=items,
                                                       out_channels=out_channels, tmp=tmp)
            manifest = {"teacher": teacher, "teacher_sha256": sha, "pool": spec["pool"], "tta": spec["tta"],
                        "cases": ids}
            reused = self._reusable(manifest)
            if not reused:
                self._predict(path, images, spec["tta"], device)
        done = self._written(ids)
        failed = [c for c in ids if c not in done]
        if not done:
            raise MedsslError(f"self_training: the teacher {teacher} labelled none of the {len(ids)} pool cases "
                              f"(see {self.folder / 'predict_report.json'})")
        if not reused:
            (self.folder / MANIFEST).write_text(json.dumps(manifest | {"failed": failed}, indent=1))
        if failed:
            log.warning("self_training: %d pool case(s) failed in the teacher and are left out (e.g. %s; %s)",
                        len(failed), failed[:3], self.folder / "predict_report.json")
        self.items = [{"image": images[c], "label": str(done[c]), "case_id": PSEUDO_PREFIX + c}
                      for c in ids if c in done]
        self.report = {"teacher": teacher, "teacher_sha256": sha, "pool": spec["pool"], "cases": len(self.items),
                       "failed": failed, "reused": reused, "tta": spec["tta"]}
        log.info("self_training: %d pseudo-labelled case(s) from %s (%s)", len(self.items), teacher,
                 "reused" if reused else "predicted")

    @staticmethod
    def _check_teacher(ckpt: dict[str, Any], source: str, items: dict[str, list[dict[str, Any]]],
                       out_channels: int) -> None:
        recipe, config = ckpt.get("recipe") or {}, ckpt.get("config") or {}
        task = config.get("task", recipe.get("task"))
        if task != "segmentation":
            raise MedsslError(f"self_training teacher {source}: a {task!r} model; self-training needs a segmentation one")
        k = int(config.get("out_channels", out_channels))
        if k != out_channels:
            raise MedsslError(f"self_training teacher {source}: {k} classes, this run has out_channels={out_channels}")
        train, val, test = _teacher_cases(config, source)
        run_test = {it["case_id"] for it in items["test"]}
        run_val = {it["case_id"] for it in items["validation"]}
        saw = sorted((train | val) & run_test)
        if saw:
            raise MedsslError(f"self_training teacher {source} was trained or selected on {len(saw)} of this run's "
                              f"test case(s) (e.g. {saw[:3]}): its labels would leak the test set")
        trained = sorted(train & run_val)
        if trained:
            raise MedsslError(f"self_training teacher {source} was trained on {len(trained)} of this run's validation "
                              f"case(s) (e.g. {trained[:3]}): selection would be biased")

    @staticmethod
    def _pool_images(ids: Sequence[str], datalist: Path) -> dict[str, str]:
        from medssl.engines.finetune.data import datalist_by_case

        by_id = datalist_by_case(datalist)
        out: dict[str, str] = {}
        for c in ids:
            if c not in by_id:
                raise MedsslError(f"self_training: pool case {c} of the splits is not in {datalist}")
            image = by_id[c].get("image")
            if not isinstance(image, str) or not image.endswith((".nii", ".nii.gz")):
                raise MedsslError(f"self_training: pool case {c} of {datalist} has image {image!r}; the teacher "
                                  "reads one NIfTI file per case (the datalists `medssl ingest` writes; multi-file "
                                  "channels are not supported)")
            p = Path(image)
            out[c] = str(p if p.is_absolute() else (datalist.parent / p).resolve())
        return out

    def _reusable(self, manifest: dict[str, Any]) -> bool:
        """``True`` when the folder holds the labels of ``manifest``; ``False`` when it holds none (no manifest:
        never made, or interrupted while predicting).

        Raises:
            MedsslError: the folder holds labels of another teacher, pool or tta setting: relabelling would change
                the training data under a run that may already have trained on them (delete the folder to relabel).
        """
        path = self.folder / MANIFEST
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        changed = sorted(k for k in manifest if old.get(k) != manifest[k])
        if changed:
            raise MedsslError(f"self_training: {path} was made with other {changed} than this run's; its pseudo-labels "
                              "would change under a run that may have trained on them. Delete that folder (and the "
                              "run's checkpoints) to relabel, or use another out_dir")
        return True

    def _written(self, ids: Sequence[str]) -> dict[str, Path]:
        return {c: self.folder / f"{c}_seg.nii.gz" for c in ids if (self.folder / f"{c}_seg.nii.gz").is_file()}

    def _predict(self, teacher: Path, images: dict[str, str], tta: bool, device: str) -> None:
        """Teacher labels for every pool image, named by case id (staged as links named ``<case id>.nii.gz``: files
        of different folders may share a name)."""
        from medssl.deploy.predict import predict

        (self.folder / MANIFEST).unlink(missing_ok=True)
        for old in self.folder.glob("*_seg.nii.gz"):
            old.unlink()
        with tempfile.TemporaryDirectory(prefix="medssl_pool_") as stage:
            _stage_pool(images, Path(stage))
            predict(teacher, [stage], self.folder, device=device, tta=tta)
