"""The ``finetune_seg`` MONAI inference bundle: its ``_target_`` helpers and ``medssl export --bundle`` (a zip).

``bundles/finetune_seg/configs/inference.yaml`` runs a finetuned segmentation model on a folder of NIfTI
volumes with MONAI components only (``preprocess_transforms`` → ``SlidingWindowInferer`` (Gaussian) →
softmax → ``Invertd`` → argmax → ``SaveImaged``), giving the labels of ``medssl predict`` (without TTA)::

    python -m monai.bundle run --config_file bundles/finetune_seg/configs/inference.yaml \\
        --ckpt_path runs/ft/checkpoints/best.pt --dataset_dir scans/ --output_dir seg/

`write_bundle_zip` packs that config with a model into ``<name>/`` (MONAI model-zoo layout)::

    <name>/configs/inference.yaml  metadata.json  logging.conf  recipe.json
    <name>/models/model.pt          (the network's state dict, MONAI's convention)
    <name>/docs/README.md

Extracted into a folder ``D``, ``monai.bundle.load(name, model=net, bundle_dir=D)`` loads the weights locally,
and ``python -m monai.bundle run --config_file D/<name>/configs/inference.yaml --bundle_root D/<name>
--dataset_dir … --output_dir …`` runs it (``ckpt_path`` and ``recipe_path`` default into ``bundle_root``).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from medssl.errors import MedsslError

__all__ = ["BUNDLE_DIR", "load_bundle_model", "folder_datalist", "write_bundle_zip"]

log = logging.getLogger(__name__)

#: the bundle shipped in the repository (configs copied into every zip)
BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "finetune_seg"


def load_bundle_model(ckpt_path: str | Path, recipe_path: str | Path | None = None,
                      device: str | torch.device = "cpu") -> Any:
    """The `DeployModel` of a bundle's ``ckpt_path``: a medssl finetune checkpoint (``best.pt``, recipe inside)
    or a plain state dict (a bundle's ``models/model.pt``) with the ``recipe.json`` written by
    `write_bundle_zip` (``{"recipe", "preprocessing"}``).

    Raises:
        MedsslError: a missing/unreadable file, or a state dict without a readable ``recipe_path``.
    """
    from medssl.deploy.model import DeployModel, load_model

    path = Path(ckpt_path)
    if not path.is_file():
        raise MedsslError(f"bundle ckpt_path {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "recipe" in state:
        return load_model(path, device=device)
    try:
        meta = json.loads(Path(str(recipe_path)).read_text())
        recipe, prep = meta["recipe"], meta["preprocessing"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MedsslError(f"bundle ckpt_path {path} is a plain state dict; its recipe_path {recipe_path} must be "
                          f"the bundle's configs/recipe.json ({e})") from e
    from medssl.engines.finetune.build import rebuild_model

    network = rebuild_model(recipe)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise MedsslError(f"bundle weights {path} do not fit the network of {recipe_path}: {e}") from e
    network = network.to(torch.device(device)).eval()
    return DeployModel(network=network, recipe=recipe, preprocessing=prep, source=str(path))


def folder_datalist(dataset_dir: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` of the NIfTI files (``.nii.gz`` / ``.nii``) directly in ``dataset_dir``, sorted.

    Raises:
        MedsslError: the folder is missing or holds no NIfTI file.
    """
    folder = Path(dataset_dir)
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.name.lower().endswith((".nii.gz", ".nii")))
    if not files:
        raise MedsslError(f"bundle dataset_dir {folder}: no .nii.gz / .nii file found")
    return [{"image": str(p)} for p in files]


def _metadata(prep: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The repository's metadata.json, filled with this model's classes, channels and patch size."""
    meta = json.loads((BUNDLE_DIR / "configs" / "metadata.json").read_text())
    classes = {str(k): str(v) for k, v in prep["class_names"].items()}
    meta["label_classes"] = ", ".join(f"{k}: {v}" for k, v in classes.items())
    meta["network_data_format"]["inputs"]["image"] |= {"num_channels": int(prep["in_channels"]),
                                                       "spatial_shape": list(prep["roi_size"])}
    meta["network_data_format"]["outputs"]["pred"] |= {"num_channels": int(prep["out_channels"]),
                                                       "spatial_shape": list(prep["roi_size"]), "channel_def": classes}
    meta["medssl_network"] = str(recipe["build"].get("kind"))
    return meta


def write_bundle_zip(model: str | Path, out_zip: str | Path, *, name: str | None = None,
                     tracking_uri: str | None = None) -> Path:
    """Write a MONAI bundle zip of a finetuned segmentation model (layout: module docstring).

    Args:
        model: checkpoint, run folder, ``runs:/`` or ``models:/`` URI (:func:`medssl.deploy.model.load_model`).
        out_zip: the zip file (``.zip``; parent folders created).
        name: bundle name = the zip's root folder (default: the zip's stem).
        tracking_uri: MLflow store for URIs.

    Returns:
        ``out_zip``.

    Raises:
        MedsslError: a bad model, a classification model (the bundle segments), or an unwritable ``out_zip``.
    """
    import io

    from medssl.deploy.model import load_model

    m = load_model(model, tracking_uri=tracking_uri)
    if m.preprocessing.get("task") != "segmentation":
        raise MedsslError(f"model {model}: the finetune_seg bundle needs a segmentation model, this one is "
                          f"{m.preprocessing.get('task')!r}")
    out = Path(out_zip)
    if out.suffix != ".zip":
        raise MedsslError(f"--bundle {out}: expected a .zip file name")
    root = name or out.stem
    weights = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in m.network.state_dict().items()}, weights)
    recipe = json.dumps({"recipe": m.recipe, "preprocessing": m.preprocessing}, indent=1, default=str)
    configs = BUNDLE_DIR / "configs"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{root}/configs/inference.yaml", (configs / "inference.yaml").read_text())
            z.writestr(f"{root}/configs/logging.conf", (configs / "logging.conf").read_text())
            z.writestr(f"{root}/configs/metadata.json", json.dumps(_metadata(m.preprocessing, m.recipe), indent=1))
            z.writestr(f"{root}/configs/recipe.json", recipe)
            z.writestr(f"{root}/models/model.pt", weights.getvalue())
            z.writestr(f"{root}/docs/README.md", (BUNDLE_DIR / "docs" / "README.md").read_text())
    except OSError as e:
        raise MedsslError(f"cannot write bundle {out}: {e}") from e
    log.info("bundle %s (%s, %d classes) → %s", root, m.recipe["build"].get("kind"), m.preprocessing["out_channels"],
             out)
    return out
