"""Fixtures of the tracking tests: a session-wide MLflow server on PostgreSQL (marker ``server``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.tracking._pg import PgMlflow, find_pg_bin, start_pg_mlflow


@pytest.fixture(scope="session")
def _pg_mlflow_session() -> Iterator[PgMlflow]:
    """PostgreSQL 15 + ``mlflow server`` (+ moto S3 artifacts where ``moto[server]`` is installed).

    Skips only where the PostgreSQL binaries or psycopg2 are missing; a server that is there but fails to
    start is an error, not a skip.
    """
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[dev]'")
    srv = start_pg_mlflow()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def pg_mlflow(_pg_mlflow_session: PgMlflow) -> PgMlflow:
    """The session's server, up (an outage test that failed midway may have left it stopped)."""
    _pg_mlflow_session.ensure_up()
    return _pg_mlflow_session
