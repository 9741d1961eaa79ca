"""`medssl register`: a finetuned segmentation run → an MLflow registered model version with an alias.

The model is the pyfunc :class:`medssl.deploy.pyfunc.MedsslSegModel` (base64 NIfTI in, base64 NIfTI labels
out, through ``medssl predict``'s code path), logged with a signature, an input example (a real volume of
the run's datalist, or ``example``), its artifacts ``checkpoint`` (the run's ``best.pt``: the only ``.pt``
file, so ``medssl predict models:/<name>@<alias>`` loads it too) and ``recipe`` (``recipe.json``: the full
recipe and the preprocessing dict). The version gets the preprocessing and the run's test metrics as tags
(``medssl.recipe.<key>``, ``medssl.test.<metric>``) and a description naming them; then the alias is set
(``MlflowClient.set_registered_model_alias``).

Where the run is an MLflow run of the same store, the model is logged into it (the version links to the
finetune run and its test metrics); a local run folder or checkpoint without one gets a new run in the
experiment ``medssl-registry`` and its metrics from ``results.json``.

Example::

    res = register_model("runs/ft", "hippo-seg", alias="champion")
    mlflow.pyfunc.load_model(res.model_uri)      # models:/hippo-seg@champion
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError

__all__ = ["RegisteredVersion", "register_model", "resolve_run", "example_volume", "REGISTRY_EXPERIMENT"]

log = logging.getLogger(__name__)

REGISTRY_EXPERIMENT = "medssl-registry"
MODEL_NAME_IN_RUN = "medssl_model"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_COPIED_RUN_TAGS = ("medssl.study", "medssl.fraction", "medssl.init", "medssl.seed", "medssl.config_hash",
                    "medssl.data_hash", "medssl.git_sha")


@dataclass(frozen=True)
class RegisteredVersion:
    """What `register_model` registered.

    Attributes:
        name: registered model name; ``version``: its new version (string, MLflow's type).
        alias: the alias set (``None``: none).
        model_uri: ``models:/<name>@<alias>`` (or ``models:/<name>/<version>`` without alias).
        run_id: the MLflow run the model was logged into.
        test_metrics: the run's ``test_*`` metrics (also the version's ``medssl.test.*`` tags).
    """

    name: str
    version: str
    alias: str | None
    model_uri: str
    run_id: str
    test_metrics: dict[str, float] = field(default_factory=dict)


def _results(*candidates: Path) -> dict[str, Any]:
    for p in candidates:
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                log.warning("unreadable %s: ignored", p)
    return {}


def resolve_run(run: str | Path, tmp: str | Path, *, tracking_uri: str | None = None
                ) -> tuple[Path, str | None, dict[str, Any]]:
    """``(checkpoint file, MLflow run id or None, results.json dict)`` of ``run``.

    Args:
        run: a finetune run id (32 hex digits) or ``runs:/<id>``, a run folder, or a checkpoint file.
        tmp: where an MLflow checkpoint is downloaded.

    Raises:
        MedsslError: ``run`` is neither an existing path nor a run id, or holds no finetune checkpoint.
    """
    from medssl.deploy.model import resolve_source
    from medssl.engines.runtime.checkpoint import load_checkpoint

    src = str(run)
    path = Path(src)
    if path.exists():
        ckpt = resolve_source(path, tmp)
        folders = [path] if path.is_dir() else []
        results = _results(*(f / "results.json" for f in folders + [ckpt.parent.parent, ckpt.parent]))
        run_id = results.get("run_id") or load_checkpoint(ckpt).get("mlflow_run_id")
        return ckpt, (str(run_id) if run_id else None), results
    run_id = src.removeprefix("runs:/").strip("/").split("/")[0]
    if not _RUN_ID.match(run_id):
        raise MedsslError(f"RUN {src!r} is neither an existing run folder / checkpoint nor an MLflow run id "
                          "(32 hex digits or runs:/<id>)")
    ckpt = resolve_source(f"runs:/{run_id}", tmp, tracking_uri=tracking_uri)
    return ckpt, run_id, {}


def example_volume(config: dict[str, Any]) -> Path:
    """The first single-file image of the checkpoint's datalist (sections test, validation, training,
    unlabeled): the model's input example.

    Raises:
        MedsslError: no datalist or no readable single-file image in it (pass ``example`` then).
    """
    datalist = Path(str(config.get("datalist") or ""))
    try:
        data = json.loads(datalist.read_text())
    except (OSError, ValueError) as e:
        raise MedsslError(f"no input example: the run's datalist {datalist} is unreadable ({e}); pass --example "
                          "a NIfTI volume") from e
    for section in ("test", "validation", "training", "unlabeled"):
        for item in data.get(section) or []:
            image = item.get("image") if isinstance(item, dict) else None
            if isinstance(image, str):
                p = Path(image) if Path(image).is_absolute() else datalist.parent / image
                if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
                    return p
    raise MedsslError(f"no input example: no single-file NIfTI image found in {datalist}; pass --example")


def _tag_value(v: Any) -> str:
    return (v if isinstance(v, str) else json.dumps(v))[:5000]


def _description(name: str, prep: dict[str, Any], network: str, run_id: str, run_tags: dict[str, str],
                 metrics: dict[str, float]) -> str:
    classes = ", ".join(f"{k}={v}" for k, v in prep["class_names"].items())
    study = ", ".join(f"{k.removeprefix('medssl.')} {run_tags[k]}" for k in _COPIED_RUN_TAGS[:4] if k in run_tags)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) or "none logged"
    return (f"medssl {prep['task']} model ({network}; classes {classes}) finetuned in MLflow run {run_id}"
            f"{f' ({study})' if study else ''}. Test metrics: {shown}. Serve: mlflow models serve -m "
            f"models:/{name}@<alias> --env-manager local; POST /invocations "
            '{"inputs": {"nifti_b64": ["<base64 .nii.gz>"]}} -> {"predictions": [{"seg_nifti_b64": ...}]}.')


def register_model(run: str | Path, name: str, *, alias: str | None = "champion", example: str | Path | None = None,
                   tracking_uri: str | None = None, experiment: str = REGISTRY_EXPERIMENT) -> RegisteredVersion:
    """Log a finetuned segmentation run as an MLflow pyfunc model, register a version, set the alias.

    Args:
        run: finetune run id / ``runs:/<id>``, run folder or checkpoint file (`resolve_run`).
        name: registered model name (created if missing).
        alias: alias to point at the new version (e.g. ``champion``); ``None``: none.
        example: a NIfTI volume for the input example (default: `example_volume` of the run's datalist).
        tracking_uri: MLflow tracking and registry store (default ``$MLFLOW_TRACKING_URI`` or ``./mlruns.db``).
        experiment: experiment of the new run when ``run`` has no MLflow run in this store.

    Returns:
        A `RegisteredVersion`; ``mlflow.pyfunc.load_model(result.model_uri)`` loads the model.

    Raises:
        MedsslError: a bad ``run`` / ``example``, a classification model (the pyfunc serves segmentation), or
            an MLflow failure (naming the store).
    """
    import mlflow

    from medssl.deploy.model import load_model
    from medssl.deploy.pyfunc import INPUT_COLUMN, MedsslSegModel, encode_nifti, model_signature
    from medssl.engines.runtime.checkpoint import load_checkpoint
    from medssl.tracking.mlflow_tracker import default_tracking_uri

    if not re.match(r"^[A-Za-z0-9][\w.\- ]*$", name or ""):
        raise MedsslError(f"model name {name!r}: use letters, digits, '.', '-', '_' or spaces")
    uri = tracking_uri or default_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tempfile.TemporaryDirectory(prefix="medssl_register_") as tmp:
        ckpt, run_id, results = resolve_run(run, tmp, tracking_uri=uri)
        model = load_model(ckpt)
        prep, recipe = model.preprocessing, model.recipe
        if prep["task"] != "segmentation":
            raise MedsslError(f"{run}: a {prep['task']} model; medssl register serves segmentation models")
        mlflow_run = None
        if run_id:
            try:
                mlflow_run = client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 - MLflow raises several types for "no such run"
                log.warning("run %s is not in %s (%s): logging the model into a new run", run_id, uri, e)
        metrics = ({k: float(v) for k, v in mlflow_run.data.metrics.items() if k.startswith("test_")} if mlflow_run
                   else {f"test_{k}": float(v) for k, v in (results.get("test_metrics") or {}).items()})
        run_tags = dict(mlflow_run.data.tags) if mlflow_run else {}
        ex_path = Path(example) if example is not None else example_volume(load_checkpoint(ckpt).get("config") or {})
        if not ex_path.is_file():
            raise MedsslError(f"input example {ex_path} not found")
        recipe_path = Path(tmp) / "recipe.json"
        recipe_path.write_text(json.dumps({"recipe": recipe, "preprocessing": prep}, indent=1, default=str))
        import pandas as pd

        info = _log(mlflow, uri, mlflow_run, experiment, name, ckpt, recipe_path,
                    pd.DataFrame({INPUT_COLUMN: [encode_nifti(ex_path)]}), model_signature(), MedsslSegModel())
    run_id = info.run_id
    version = str(info.registered_model_version)
    tags = {f"medssl.recipe.{k}": _tag_value(v) for k, v in prep.items()}
    tags |= {"medssl.network": str(recipe["build"].get("kind")), "medssl.source_run": run_id,
             "medssl.source": str(run)} | {k: v for k, v in run_tags.items() if k in _COPIED_RUN_TAGS}
    tags |= {f"medssl.test.{k.removeprefix('test_')}": repr(v) for k, v in metrics.items()}
    try:
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.update_model_version(name, version, description=_description(
            name, prep, str(recipe["build"].get("kind")), run_id, run_tags, metrics))
        if alias:
            client.set_registered_model_alias(name, alias, version)
    except Exception as e:  # noqa: BLE001 - any MLflow failure here is one user-facing error
        raise MedsslError(f"registered {name} version {version} in {uri} but could not tag it / set alias "
                          f"{alias!r}: {e}") from e
    model_uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    log.info("registered %s version %s (run %s) → %s", name, version, run_id, model_uri)
    return RegisteredVersion(name=name, version=version, alias=alias, model_uri=model_uri, run_id=run_id,
                             test_metrics=metrics)


def _log(mlflow: Any, uri: str, run: Any, experiment: str, name: str, ckpt: Path, recipe_path: Path,
         example: Any, signature: Any, python_model: Any) -> Any:
    """``mlflow.pyfunc.log_model`` into ``run`` (resumed, its status restored) or a new run; registers ``name``."""
    import medssl

    with _fluent_store(uri):
        return _log_in_store(mlflow, uri, run, experiment, name, ckpt, recipe_path, example, signature, python_model,
                             [f"mlflow=={mlflow.__version__}", f"medssl=={medssl.__version__}"])


@contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model`` needs it) at ``uri`` for the block, then restore exactly what
    was there: the module globals and ``$MLFLOW_TRACKING_URI`` (``mlflow.set_tracking_uri`` also sets it, and
    MLflow's own ``_use_tracking_uri`` unsets a user's variable on exit)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old = (tracking_utils._tracking_uri, registry_utils._registry_uri, os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old[0])
        registry_utils._registry_uri = old[1]
        if old[2] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old[2]


def _log_in_store(mlflow: Any, uri: str, run: Any, experiment: str, name: str, ckpt: Path, recipe_path: Path,
                  example: Any, signature: Any, python_model: Any, reqs: list[str]) -> Any:
    """`_log` with the fluent store set: resume ``run`` (its status restored after) or start a new run."""
    try:
        if run is not None:
            mlflow.start_run(run_id=run.info.run_id)
            status = run.info.status
        else:
            from medssl.tracking.mlflow_tracker import artifact_location

            if mlflow.get_experiment_by_name(experiment) is None:  # artifacts beside a local store, not in the cwd
                mlflow.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
            mlflow.set_experiment(experiment)
            mlflow.start_run(run_name=f"register-{name}", tags={"medssl.kind": "register", "medssl.source": str(ckpt)})
            status = "FINISHED"
        try:
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN, python_model=python_model, signature=signature, input_example=example,
                artifacts={"checkpoint": str(ckpt), "recipe": str(recipe_path)}, registered_model_name=name,
                pip_requirements=reqs, await_registration_for=60,
            )
        finally:
            mlflow.end_run(status=status)
    except MedsslError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "could not log/register"
        raise MedsslError(f"cannot log/register model {name!r} in MLflow at {uri}: {type(e).__name__}: {e}") from e
