"""The real ``mlflow models serve -m models:/NAME@champion --env-manager local`` on 127.0.0.1 (README command 2):
real hippocampus volumes posted as base64 NIfTI come back as label maps equal to `medssl predict`'s (voxel for
voxel, same affine); garbage base64, a non-NIfTI file, 2D / 4D volumes and an oversized payload each get HTTP
400 naming the reason, and the server answers the next good request."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.deploy.predict import predict
from medssl.deploy.pyfunc import MAX_MB_ENV, decode_labels, encode_nifti
from medssl.deploy.registry import register_model
from tests.deploy._finetuned import finetune_seg

NAME = "hippo-serve"
MAX_MB = 1  # the server's MEDSSL_SERVE_MAX_MB in this test


@pytest.fixture(scope="module")
def registered(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(tracking uri, run folder)`` of a tiny real finetuning registered as ``NAME@champion``."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    ft, out = finetune_seg(hippocampus_dir, tmp, experiment="deploy-serve", tracking_uri=uri)
    register_model(ft.tracker.run_id, NAME, alias="champion", tracking_uri=uri)
    return uri, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registered: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real MLflow scoring server (a subprocess in its own session), torn down in a finally."""
    uri, _ = registered
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, MAX_MB_ENV: str(MAX_MB), "OMP_NUM_THREADS": "1",
                        "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn: the venv's
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 120 s: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _post(base: str, payload: dict | bytes) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _inputs(*b64: str) -> dict:
    return {"inputs": {"nifti_b64": list(b64)}}


def _volumes(hippocampus_dir: Path) -> list[Path]:
    return sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[20:22]


def _check_equals_predict(resp: dict, vols: list[Path], run: Path, out: Path) -> None:
    ref = predict(run, vols, out)
    assert ref.exit_code == 0 and len(resp["predictions"]) == len(vols)
    for pred, row, vol in zip(resp["predictions"], ref.ok, vols, strict=True):
        labels, affine = decode_labels(pred["seg_nifti_b64"])
        want = nib.load(row["outputs"]["seg"])
        assert labels.shape == nib.load(vol).shape and np.array_equal(labels, np.asarray(want.dataobj))
        assert np.allclose(affine, nib.load(vol).affine, atol=1e-5) and np.allclose(affine, want.affine)


def test_served_labels_equal_medssl_predict(server: str, registered, hippocampus_dir: Path, tmp_path: Path) -> None:
    vols = _volumes(hippocampus_dir)
    status, resp = _post(server, _inputs(*map(encode_nifti, vols)))
    assert status == 200, resp
    _check_equals_predict(resp, vols, registered[1], tmp_path / "ref")


def _nifti_b64(array: np.ndarray, tmp: Path, name: str) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), tmp / name)
    return encode_nifti(tmp / name)


def test_bad_payloads_get_400_and_the_server_goes_on(server: str, registered, hippocampus_dir: Path,
                                                     tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(72, 72, 72)).astype(np.float32)  # noise: ~1.4 MB gzipped > MAX_MB
    cases = {
        "garbage": ("@@ not base64 !!", "not valid base64"),
        "non_nifti": (base64.b64encode(gzip.compress(b"just some text, not an image")).decode(), "unreadable_nifti"),
        "2d": (_nifti_b64(rng.normal(size=(24, 20)).astype(np.float32), tmp_path, "flat.nii.gz"), "not_3d: 2D image"),
        "4d": (_nifti_b64(rng.normal(size=(16, 16, 12, 3)).astype(np.float32), tmp_path, "t.nii.gz"), "not_3d: 4D multi-channel"),
        "oversized": (_nifti_b64(big, tmp_path, "big.nii.gz"), "payload too large"),
    }
    good = _volumes(hippocampus_dir)[:1]
    for what, (b64, reason) in cases.items():
        status, resp = _post(server, _inputs(b64))
        assert status == 400, (what, status, resp)
        assert reason in resp.get("message", ""), (what, resp)
        assert "medssl:" in resp["message"]
        status, ok = _post(server, _inputs(encode_nifti(good[0])))  # the server still serves
        assert status == 200, (what, ok)
    _check_equals_predict(ok, good, registered[1], tmp_path / "ref")
    status, resp = _post(server, b"{not json")
    assert 400 <= status < 500
