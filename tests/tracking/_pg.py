"""A team MLflow server without Docker (issue 11): PostgreSQL 15 from the machine's binaries (``initdb``,
``pg_ctl``) on a temp dir and a free port, ``mlflow server --backend-store-uri postgresql://…`` with artifacts
on moto's S3 server (an S3-compatible store, like the MinIO of ``docker/compose.yaml``) when ``moto[server]`` is
installed, else on a local folder. Everything can be stopped and restarted on the same ports (outage tests).

As root, PostgreSQL refuses to run: ``initdb``/``pg_ctl`` run as the ``postgres`` OS user (created with
``useradd`` where missing) through ``runuser``; the data dir lives in a fresh ``/tmp`` folder owned by that user
(pytest's own temp dirs are mode 0700 and would be unreachable to it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.tracking.mlflow_server import free_port

__all__ = ["PgMlflow", "find_pg_bin", "start_pg_mlflow"]

_BUCKET = "mlflow-artifacts"


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$PATH``, /usr/local/bin, then /usr/lib/postgresql/*/bin."""
    cands = [Path(p).parent for p in (shutil.which("initdb"),) if p]
    cands += [Path("/usr/local/bin")] + [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for c in cands:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    return None


def _as_pg_user(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _kill_group(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@dataclass
class PgMlflow:
    """A running PostgreSQL + (optional moto S3) + ``mlflow server`` set; :meth:`stop` / :meth:`start` again.

    Attributes:
        uri: the tracking URI ``http://127.0.0.1:<port>``.
        backend_uri: ``postgresql+psycopg2://postgres@127.0.0.1:<pg_port>/mlflow`` (SQLAlchemy 2.1 defaults to psycopg 3).
        artifacts: ``s3://mlflow-artifacts/`` on moto, or a local folder path.
        s3_endpoint: moto's endpoint, ``None`` for local artifacts.
    """

    root: Path
    bin_dir: Path
    pg_user: str | None
    pg_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    s3_port: int | None = None
    mlflow_proc: subprocess.Popen | None = None
    s3_proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/mlflow"

    @property
    def s3_endpoint(self) -> str | None:
        return f"http://127.0.0.1:{self.s3_port}" if self.s3_port else None

    @property
    def artifacts(self) -> str:
        return f"s3://{_BUCKET}/" if self.s3_port else str(self.root / "artifacts")

    @property
    def s3_env(self) -> dict[str, str]:
        if not self.s3_port:
            return {}
        return {"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint or "", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    # -- PostgreSQL ---------------------------------------------------------------------------------------
    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        cmd = _as_pg_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "pgdata"), *args], self.pg_user)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)

    def init_pg(self) -> None:
        out = subprocess.run(
            _as_pg_user([str(self.bin_dir / "initdb"), "-D", str(self.root / "pgdata"), "-U", "postgres",
                         "--auth=trust", "-E", "UTF8", "--no-sync"], self.pg_user),
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr[-2000:]}")

    def start_pg(self) -> None:
        opts = (f"-p {self.pg_port} -k {self.root / 'sock'} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=50")
        out = self._pg_ctl("-o", opts, "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start")
        if out.returncode != 0:
            log = (self.root / "pg.log").read_text()[-2000:] if (self.root / "pg.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {out.stderr[-1000:]} {log}")

    def stop_pg(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def create_db(self) -> None:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        con.close()

    # -- S3 (moto) ----------------------------------------------------------------------------------------
    def start_s3(self) -> bool:
        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if moto is None:
            return False
        self.s3_port = self.s3_port or free_port()
        self.s3_proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        if not _wait_http(f"{self.s3_endpoint}/moto-api/", self.s3_proc, 60):
            _kill_group(self.s3_proc)
            self.s3_port, self.s3_proc = None, None
            return False
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket=_BUCKET)
        return True

    # -- mlflow server ------------------------------------------------------------------------------------
    def start_mlflow(self, timeout_s: float = 120.0) -> None:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", self.backend_uri, "--artifacts-destination", self.artifacts]
        env = {**os.environ, **self.s3_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "mlflow.log", "ab") as logf:
            self.mlflow_proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=logf, stderr=logf,
                                                start_new_session=True)
        if not _wait_http(f"{self.uri}/health", self.mlflow_proc, timeout_s):
            tail = (self.root / "mlflow.log").read_text(errors="replace")[-2000:]
            _kill_group(self.mlflow_proc)
            raise RuntimeError(f"mlflow server on {self.backend_uri} did not start: {tail}")

    def stop(self) -> None:
        """Outage: the mlflow server and PostgreSQL both go down (S3 stays)."""
        _kill_group(self.mlflow_proc)
        self.stop_pg()

    def start(self) -> None:
        """Back up on the same ports and data."""
        self.start_pg()
        self.start_mlflow()

    def ensure_up(self) -> None:
        """Start whatever a failed outage test left down."""
        if self._pg_ctl("status").returncode != 0:
            self.start_pg()
        if self.mlflow_proc is None or self.mlflow_proc.poll() is not None:
            self.start_mlflow()

    def close(self) -> None:
        self.stop()
        _kill_group(self.s3_proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_os_user() -> str | None:
    """``None`` when not root; else the ``postgres`` OS user (created with ``useradd`` where missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True, timeout=30)
    return "postgres"


def start_pg_mlflow(s3: bool = True) -> PgMlflow:
    """Start PostgreSQL, (moto S3), and ``mlflow server``; raises ``RuntimeError`` naming the failing step.

    Args:
        s3: artifacts on moto's S3 server when ``moto[server]`` is installed (else a local folder).
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("initdb/pg_ctl not found (apt-get install postgresql)")
    user = _pg_os_user()
    root = Path(tempfile.mkdtemp(prefix="medssl-pg-"))
    (root / "sock").mkdir()
    if user:
        pw = pwd.getpwnam(user)
        for p in (root, root / "sock"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(root, 0o755)
    srv = PgMlflow(root, bin_dir, user)
    try:
        srv.init_pg()
        srv.start_pg()
        srv.create_db()
        if s3:
            srv.start_s3()
        srv.start_mlflow()
    except BaseException:
        srv.close()
        raise
    return srv
