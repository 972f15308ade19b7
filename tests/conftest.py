"""Shared fixtures: one store suite runs unchanged against SQLite and PostgreSQL.

PostgreSQL comes from `JOBQUEUE_TEST_POSTGRES_URL`, else the local default below. Each test gets
its own schema, so tests never see each other's rows and need no cleanup between them. Without a
server the PostgreSQL cases skip with the reason; when the variable is set explicitly (as
`.ci/run` does) an unreachable server fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_pg_status: dict[str, str | None] = {}


def postgres_base_url() -> str:
    return os.environ.get("JOBQUEUE_TEST_POSTGRES_URL") or DEFAULT_PG_URL


def postgres_unavailable() -> str | None:
    """None when PostgreSQL answers, else why not (computed once per run)."""
    if "reason" not in _pg_status:
        url = postgres_base_url()
        try:
            import psycopg  # noqa: F401

            engine = create_engine(url, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            engine.dispose()
            _pg_status["reason"] = None
        except Exception as exc:  # any failure means: no usable server here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _pg_status["reason"] = f"PostgreSQL not reachable at {url}: {first}"
    return _pg_status["reason"]


def _require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("JOBQUEUE_TEST_POSTGRES_URL"):
        pytest.fail(f"JOBQUEUE_TEST_POSTGRES_URL is set but {reason}")
    pytest.skip(f"{reason} (set JOBQUEUE_TEST_POSTGRES_URL to a reachable server to run these)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    _require_postgres()
    base = postgres_base_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobqueue.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once a run: a test's SQLite store starts as a copy of it
    (running the migrations is most of what opening a fresh store costs)."""
    from jobqueue.store import Store

    path = tmp_path_factory.mktemp("template") / "jobqueue.db"
    Store(f"sqlite:///{path}").close()
    assert not path.with_name(path.name + "-wal").exists()  # all of it is in the one file
    return path


@pytest.fixture
def store(db_url: str, request: pytest.FixtureRequest) -> Iterator:
    from jobqueue.store import Store

    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        shutil.copyfile(request.getfixturevalue("sqlite_template"), url.database or "")
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's config, data dir or real API key."""
    for name in list(os.environ):
        if name.startswith("JOBQUEUE_") and name != "JOBQUEUE_TEST_POSTGRES_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("JOBQUEUE_DATA_DIR", str(tmp_path / "data"))
