"""The MLflow pyfunc model of a finetuned segmentation network: base64 NIfTI in, base64 NIfTI label map out.

Served by ``mlflow models serve -m models:/<name>@<alias> --env-manager local``; the request body
(``POST /invocations``, ``Content-Type: application/json``) is::

    {"inputs": {"nifti_b64": ["<base64 of a .nii.gz or .nii file>", ...]}}

and the response::

    {"predictions": [{"seg_nifti_b64": "<base64 .nii.gz: uint8 labels, the input's shape and affine>"}, ...]}

Each volume goes through :func:`medssl.deploy.predict.predict`, the code path of ``medssl predict`` (the
ingest reader and its checks, the recipe's preprocessing, Gaussian sliding window, ``Invertd`` back onto the
input's grid), so the served labels equal ``medssl predict``'s voxel for voxel. A bad volume fails the
request with HTTP 400 and a message naming the reason (``not valid base64``, the ingest reason code such as
``unreadable`` / ``not_3d``, ``payload too large``); the server keeps serving.

Environment (read per request): ``MEDSSL_SERVE_MAX_MB`` (default 256) caps one decoded volume in MB;
``MEDSSL_SERVE_DEVICE`` (default ``cpu``, read at load) places the network.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

__all__ = ["INPUT_COLUMN", "OUTPUT_COLUMN", "MAX_MB_ENV", "DEFAULT_MAX_MB", "MedsslSegModel", "model_signature",
           "encode_nifti", "decode_labels", "max_payload_bytes"]

log = logging.getLogger(__name__)

INPUT_COLUMN = "nifti_b64"
OUTPUT_COLUMN = "seg_nifti_b64"
MAX_MB_ENV = "MEDSSL_SERVE_MAX_MB"
DEFAULT_MAX_MB = 256.0
_GZIP_MAGIC = b"\x1f\x8b"


def max_payload_bytes() -> int:
    """The per-volume size limit in bytes: ``$MEDSSL_SERVE_MAX_MB`` (MB = 2**20 bytes), default 256 MB.

    Raises:
        mlflow.exceptions.MlflowException: the variable is not a positive number (HTTP 400 when serving).
    """
    raw = os.environ.get(MAX_MB_ENV, str(DEFAULT_MAX_MB))
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        _bad_request(f"{MAX_MB_ENV} must be a positive number of MB, got {raw!r}")
    return int(mb * 2**20)


def _bad_request(message: str) -> None:
    """Raise the MLflow exception the scoring server turns into HTTP 400 with ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    raise MlflowException(f"medssl: {message}", error_code=INVALID_PARAMETER_VALUE)


def encode_nifti(path: str | Path) -> str:
    """Base64 text of a NIfTI file's bytes (the request's ``nifti_b64`` value)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_labels(b64: str) -> tuple[Any, Any]:
    """``(labels (X, Y, Z) array, affine (4, 4))`` of a response's ``seg_nifti_b64`` value (client helper)."""
    import gzip

    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))
    return np.asarray(img.dataobj), img.affine


def model_signature() -> Any:
    """The pyfunc signature: one string column in (``nifti_b64``), one string column out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]))


def _volumes(model_input: Any) -> list[Any]:
    """The ``nifti_b64`` values of a pyfunc input (DataFrame, dict of columns or list of strings)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            _bad_request(f"the input needs a column {INPUT_COLUMN!r}, got {list(model_input.columns)}")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict) and INPUT_COLUMN in model_input:
        values = model_input[INPUT_COLUMN]
        return [values] if isinstance(values, str) else list(values)
    if isinstance(model_input, list | tuple) and all(isinstance(v, str) for v in model_input):
        return list(model_input)
    _bad_request(f"the input must be {{'{INPUT_COLUMN}': [base64 NIfTI, ...]}}, got {type(model_input).__name__}")
    return []


class MedsslSegModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a finetuned segmentation checkpoint (artifact ``checkpoint``: its ``best.pt``).

    ``load_context`` loads the network once (:func:`medssl.deploy.model.load_model`); ``predict`` segments
    each base64 NIfTI of the input with :func:`medssl.deploy.predict.predict` (module docstring).
    """

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact onto ``$MEDSSL_SERVE_DEVICE`` (default cpu)."""
        from medssl.deploy.model import load_model

        self._model = load_model(context.artifacts["checkpoint"], device=os.environ.get("MEDSSL_SERVE_DEVICE", "cpu"))
        if self._model.preprocessing.get("task") != "segmentation":
            raise ValueError(f"medssl pyfunc serves segmentation models, {self._model.source} is "
                             f"{self._model.preprocessing.get('task')!r}")

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow infers signatures from hints
        """Segment every volume of ``model_input`` (``{"nifti_b64": [...]}`` or a DataFrame with that column).

        Returns:
            A DataFrame with one row per volume, column ``seg_nifti_b64`` (base64 ``.nii.gz`` labels).
        """
        import pandas as pd

        return pd.DataFrame({OUTPUT_COLUMN: [self._segment(i, v) for i, v in enumerate(_volumes(model_input))]})

    def _segment(self, index: int, b64: Any) -> str:
        """One base64 NIfTI → base64 ``.nii.gz`` label map through ``medssl predict``'s code path."""
        from medssl.deploy.predict import predict
        from medssl.errors import MedsslError

        what = f"{INPUT_COLUMN}[{index}]"
        if not isinstance(b64, str) or not b64.strip():
            _bad_request(f"{what} must be a non-empty base64 string, got {type(b64).__name__}")
        limit = max_payload_bytes()
        if len(b64) * 3 // 4 > limit:  # checked before decoding: never hold a huge decoded copy
            _bad_request(f"{what}: payload too large: {len(b64) * 3 / 4 / 2**20:.2f} MB > {MAX_MB_ENV}="
                         f"{limit / 2**20:g} MB")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            _bad_request(f"{what} is not valid base64 ({e})")
        suffix = ".nii.gz" if data[:2] == _GZIP_MAGIC else ".nii"
        with tempfile.TemporaryDirectory(prefix="medssl_serve_") as tmp:
            src = Path(tmp) / f"volume{suffix}"
            src.write_bytes(data)
            del data
            try:
                res = predict(self._model, [src], Path(tmp) / "out", prefetch=False)
            except MedsslError as e:
                _bad_request(f"{what}: {e}")
            if res.failed or not res.ok:
                row = (res.failed or res.cases or [{"reason": "no_case", "detail": "nothing to segment"}])[0]
                detail = str(row.get("detail", "")).replace(str(src), "the volume")
                _bad_request(f"{what} rejected: {row.get('reason')}: {detail} (expected a 3D NIfTI volume, "
                             ".nii.gz or .nii)")
            seg = Path(res.ok[0]["outputs"]["seg"])
            log.info("served %s: %s voxels per class %s", what, res.ok[0].get("shape"),
                     res.ok[0].get("voxels_per_class"))
            return base64.b64encode(seg.read_bytes()).decode("ascii")
