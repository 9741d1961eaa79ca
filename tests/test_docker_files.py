"""Issue 11 "Docker": no Docker engine runs on our machines, so the image and compose files are checked
statically — every COPY source exists in the build context, the entrypoint is the package's console script and
its default command parses, the torch line is CI's, the image records the git sha and runs as a non-root user,
and compose's services, volumes, variables and the MLflow server's PostgreSQL / S3 URIs fit together."""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, ``\\`` continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def _args(instrs: list[tuple[str, str]], word: str) -> list[str]:
    return [a for w, a in instrs if w == word]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _build(compose: dict, service: str) -> tuple[Path, Path]:
    b = compose["services"][service]["build"]
    ctx = (DOCKER / b["context"]).resolve()
    return ctx, ctx / b.get("dockerfile", "Dockerfile")


def _defaults() -> dict[str, str]:
    """Variables of docker/.env.example."""
    rows = [ln.split("=", 1) for ln in (DOCKER / ".env.example").read_text().splitlines()]
    return {r[0].strip(): r[1].strip() for r in rows if len(r) == 2 and not r[0].lstrip().startswith("#")}


def _resolve(text: str) -> str:
    """Compose interpolation with the defaults written in compose.yaml (``${X:-d}`` → ``d``)."""
    return _VAR.sub(lambda m: m.group(3) or "", text)


def test_every_copy_source_exists_in_the_build_context(compose: dict) -> None:
    for service in ("medssl", "mlflow"):
        ctx, dockerfile = _build(compose, service)
        assert dockerfile.is_file(), dockerfile
        for args in _args(parse_dockerfile(dockerfile), "COPY") + _args(parse_dockerfile(dockerfile), "ADD"):
            parts = [p for p in _exec_form(args) if not p.startswith("--")]
            assert "--from" not in args, args
            for src in parts[:-1]:
                assert list(ctx.glob(src)), f"{dockerfile.name}: COPY source {src} missing in {ctx}"


def test_medssl_image_entrypoint_torch_sha_and_user(compose: dict) -> None:
    _, dockerfile = _build(compose, "medssl")
    instrs = parse_dockerfile(dockerfile)
    # the entrypoint is the package's console script, and the default command is one it accepts
    scripts = {e.name: e.value for e in metadata.distribution("medssl").entry_points
               if e.group == "console_scripts"}
    entry = _exec_form(_args(instrs, "ENTRYPOINT")[-1])
    assert entry[0] in scripts and scripts[entry[0]] == "medssl.cli:app"
    from medssl.cli import app

    cmd = _exec_form(_args(instrs, "CMD")[-1])
    assert CliRunner().invoke(app, [*entry[1:], *cmd]).exit_code == 0
    for service in ("medssl",):
        command = compose["services"][service].get("command") or []
        assert CliRunner().invoke(app, [*entry[1:], *command]).exit_code == 0, command
    # torch: the version the Makefile installs for CI (and `make demo`)
    pinned = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in [f"ARG {a}" for a in _args(instrs, "ARG")]
    assert any("torch==${TORCH_VERSION}" in a for a in _args(instrs, "RUN"))
    # what `medssl demo` needs: its sample folder beside the package, installed editable so the path resolves
    from medssl.demo import default_sample_dir

    sample = default_sample_dir().relative_to(REPO).parts[0]
    assert any(_exec_form(a)[0] == sample for a in _args(instrs, "COPY")), sample
    assert any("pip install -e ." in a for a in _args(instrs, "RUN"))
    # the git sha: a build arg, kept as an OCI label and as MEDSSL_GIT_SHA (read by medssl's git_sha())
    assert any(a.startswith("GIT_SHA") for a in _args(instrs, "ARG"))
    assert 'org.opencontainers.image.revision="${GIT_SHA}"' in " ".join(_args(instrs, "LABEL"))
    assert "MEDSSL_GIT_SHA=${GIT_SHA}" in " ".join(_args(instrs, "ENV"))
    assert compose["services"]["medssl"]["build"]["args"]["GIT_SHA"].startswith("${GIT_SHA")
    # non-root: the last USER is not root, and it is set before the entrypoint runs
    words = [w for w, _ in instrs]
    user = _args(instrs, "USER")[-1]
    assert user not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")


def test_git_sha_comes_from_the_image_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl.tracking.mlflow_tracker import git_sha

    monkeypatch.setenv("MEDSSL_GIT_SHA", "abc123")
    assert git_sha(tmp_path) == "abc123"  # no git repository here: the baked-in sha
    assert git_sha(REPO) not in (None, "abc123")  # in a checkout the checkout's commit wins


def test_compose_references_resolve(compose: dict) -> None:
    services, volumes = compose["services"], compose.get("volumes") or {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on unknown service {dep}"
        assert "image" in svc or "build" in svc, name
        for vol in svc.get("volumes") or []:
            source = _resolve(vol).split(":", 1)[0]
            if vol.startswith("${"):
                assert source.startswith(("/", ".")), f"{name}: bind mount {vol} has no path default"
            elif not source.startswith(("/", ".")):
                assert source in volumes, f"{name}: named volume {source} not declared"
    # every ${VAR} has a default in compose.yaml or a value in .env.example, and .env.example holds no stray name
    text = (DOCKER / "compose.yaml").read_text()
    used = {m.group(1) for m in _VAR.finditer(text)}
    env = _defaults()
    for m in _VAR.finditer(text):
        assert m.group(3) is not None or m.group(1) in env, f"${{{m.group(1)}}} has no default"
    assert set(env) <= used, set(env) - used
    # data and outputs mounted where the image expects them
    mounts = {_resolve(v).split(":")[1] for v in services["medssl"]["volumes"]}
    assert {"/data", "/outputs"} <= mounts


def test_mlflow_server_uses_the_postgres_and_s3_services_consistently(compose: dict) -> None:
    services = compose["services"]
    cmd = [str(c) for c in services["mlflow"]["command"]]
    assert cmd[:2] == ["mlflow", "server"]
    opts = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
    # backend: the postgres service, with its own user / password / database variables
    raw, pg_env = opts["--backend-store-uri"], services["postgres"]["environment"]
    assert raw == (f"postgresql+psycopg2://{pg_env['POSTGRES_USER']}:{pg_env['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{pg_env['POSTGRES_DB']}")  # the same variables, not copies of values
    backend = urlsplit(_resolve(raw))
    assert backend.hostname == "postgres" and backend.port == 5432 and backend.username and backend.password
    # the server image has the driver that scheme names, and boto3 for S3
    _, mlflow_df = _build(compose, "mlflow")
    runs = " ".join(_args(parse_dockerfile(mlflow_df), "RUN"))
    assert "psycopg2" in runs and "boto3" in runs and "mlflow==" in runs
    # artifacts: the bucket minio-init creates, on the minio service, with minio's credentials
    dest = urlsplit(opts["--artifacts-destination"])
    assert dest.scheme == "s3"
    init = " ".join(services["minio-init"]["entrypoint"])
    assert f"store/{dest.netloc}" in init and "mc mb" in init
    env, minio = services["mlflow"]["environment"], services["minio"]["environment"]
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert f"{minio['MINIO_ROOT_USER']} {minio['MINIO_ROOT_PASSWORD']}" in init
    # medssl talks to that server
    tracking = urlsplit(services["medssl"]["environment"]["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow" and tracking.port == int(opts["--port"])
    assert any(p.split(":")[-1] == opts["--port"] for p in services["mlflow"]["ports"])
