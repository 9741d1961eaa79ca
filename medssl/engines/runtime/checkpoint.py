"""Checkpoints: one dict holding the recipe, the config and every stateful object; atomic writes; resume.

Layout (``torch.save``; loadable with ``weights_only=True``)::

    {"format": 1, "recipe": {...}, "config": {...}, "step": int,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "augment": ... | None, "rng": {"python", "numpy", "torch", "cuda"},
     "data": {"epoch", "position", "order_seed"}}

The recipe (encoder recipe, method + kwargs, in_channels, roi_size, target spacing, normalisation,
library versions) is enough to rebuild and use the weights elsewhere without the original command.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.errors import ConfigMismatchError, MedsslError

__all__ = [
    "library_versions",
    "cpu_model",
    "machine_info",
    "machine_tag",
    "capture_rng",
    "restore_rng",
    "seed_all",
    "atomic_save",
    "load_checkpoint",
    "check_recipe",
    "save_encoder",
    "component_state",
    "load_component_state",
    "IDENTITY_FIELDS",
]

log = logging.getLogger(__name__)

#: recipe fields that must agree between a checkpoint and the run resuming from it
IDENTITY_FIELDS = ("method", "encoder.name", "encoder.kwargs", "in_channels", "roi_size")


def library_versions() -> dict[str, str]:
    """Versions of medssl, MONAI and torch (recorded in every recipe)."""
    import monai

    import medssl

    return {
        "medssl": str(medssl.__version__),
        "monai": str(monai.__version__),
        "torch": str(torch.__version__),
    }


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU model name from ``cpuinfo`` (Linux), else ``platform.processor()``, else ``"unknown"``."""
    import platform

    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a run's floating-point results depend on besides code, data, config and seed (recorded in every
    recipe and as the MLflow tag ``medssl.machine``, :func:`machine_tag`).

    ``cpu_capability`` is the instruction set torch's CPU kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability()``: ``"AVX512"``, ``"AVX2"``, ...). A run repeats bit for bit on the
    same kind of machine; on another kind its floating-point sums differ in the last bits and the training
    trajectory diverges: the hippocampus UNet's seed-0 5 % run gave 0.8455 test Dice on an AVX512 Xeon and
    0.8414 on an AVX2 EPYC with identical code, data and config (benchmarks/RESULTS.md, session 11), a spread
    like that between seeds.

    Returns:
        ``{"cpu": model name, "cpu_capability": str, "cuda": device name or None, "cuda_capability": "9.0" or None}``.
    """
    cuda = torch.cuda.is_available()
    cap = torch.cuda.get_device_capability() if cuda else None
    return {
        "cpu": cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cuda": torch.cuda.get_device_name() if cuda else None,
        "cuda_capability": f"{cap[0]}.{cap[1]}" if cap else None,
    }


def machine_tag(info: dict[str, Any] | None = None) -> str:
    """``"AMD EPYC | AVX2"`` or ``"... | AVX512 | NVIDIA H200 (9.0)"``: :func:`machine_info` as one tag value."""
    info = info if info is not None else machine_info()
    parts = [str(info.get("cpu")), str(info.get("cpu_capability"))]
    if info.get("cuda"):
        parts.append(f"{info['cuda']} ({info.get('cuda_capability')})")
    return " | ".join(parts)


def capture_rng() -> dict[str, Any]:
    """States of Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored only when the device count matches)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG (``seed % 2**32``) and torch (every device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def component_state(obj: Any) -> Any:
    """Checkpointable state of an optional component (augmentation): ``state_dict()``, else its
    ``generator`` (``torch.Generator``) state, else ``None``."""
    if obj is None:
        return None
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    gen = getattr(obj, "generator", None)
    if isinstance(gen, torch.Generator):
        return {"generator": gen.get_state()}
    return None


def load_component_state(obj: Any, state: Any) -> None:
    """Inverse of :func:`component_state`."""
    if obj is None or state is None:
        return
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    elif isinstance(getattr(obj, "generator", None), torch.Generator):
        obj.generator.set_state(state["generator"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict (``weights_only=True``: no code is executed).

    Raises:
        MedsslError: missing or unreadable file, or not a medssl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsslError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means an unusable file
        raise MedsslError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "recipe" not in ckpt:
        raise MedsslError(f"{path} is not a medssl checkpoint (no embedded recipe)")
    return ckpt


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_recipe(
    saved: dict[str, Any],
    current: dict[str, Any],
    fields: tuple[str, ...] = IDENTITY_FIELDS,
    what: str = "checkpoint recipe vs run config",
) -> None:
    """Raise if ``saved`` and ``current`` recipes differ on identity fields.

    Raises:
        ConfigMismatchError: naming each differing field with both values, e.g.
            ``method: 'simclr' != 'byol'``.
    """
    diff = {}
    for f in fields:
        a, b = _get(saved, f), _get(current, f)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diff[f] = (a, b)
    if diff:
        raise ConfigMismatchError(diff, what=what)


def save_encoder(out_dir: str | Path, encoder: torch.nn.Module, recipe: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``encoder.pt`` (``{"recipe", "state_dict"}``) and ``encoder.json`` (how to load it).

    ``encoder.json`` holds the recipe, the key prefix of these weights in each downstream network
    (``encoder.downstream``, e.g. ``{"SwinUNETR": "swinViT."}``) and the preprocessing to apply.

    Returns:
        ``(encoder.pt path, encoder.json path)``.
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    pt = atomic_save({"format": 1, "recipe": recipe, "state_dict": state}, out_dir / "encoder.pt")
    how = {
        "file": pt.name,
        "recipe": recipe,
        "state_dict_keys": "those of rebuild_encoder(recipe['encoder']) (medssl.networks.encoders)",
        "downstream_prefixes": dict(getattr(encoder, "downstream", {}) or {}),
        "preprocessing": {
            k: recipe.get(k)
            for k in ("in_channels", "roi_size", "target_spacing", "normalisation", "ct_window")
        },
        "load": "ckpt = torch.load('encoder.pt', weights_only=True); "
        "enc = rebuild_encoder(ckpt['recipe']['encoder']); enc.load_state_dict(ckpt['state_dict'])",
    }
    js = out_dir / "encoder.json"
    tmp = js.with_name(".encoder.json.tmp")
    tmp.write_text(json.dumps(how, indent=2, default=str))
    os.replace(tmp, js)
    return pt, js
