"""Test fixtures: a real PostgreSQL (the embedded server, or IMSRC_TEST_DATABASE_URL), a fresh database
migrated with `alembic upgrade head`, and each test inside a transaction that is rolled back."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from imsrc.config import Settings
from imsrc.db.embedded import EmbeddedServer
from imsrc.db.engine import make_engine, upgrade
from imsrc.db.session import Database

# Tests run torch unless they ask for another engine (tests/test_inference.py): an ONNX export on first load
# would slow every test that builds a model. Subprocesses inherit it (tests/helpers.run_cli keeps it).
os.environ.setdefault("IMSRC_INFERENCE", "torch")
# TestClient sends `Host: testserver`, which the app's Host allow-list (against DNS rebinding) would refuse.
os.environ.setdefault("IMSRC_ALLOWED_HOSTS", '["testserver"]')


def _scratch_dir(prefix: str) -> Path:
    # Not pytest's tmp_path: pytest resets /tmp/pytest-of-<user> to 0700 and prunes old runs whenever any
    # pytest session starts, which would lock the embedded server (running as another OS user when we are
    # root) out of its own data directory.
    return Path(tempfile.mkdtemp(prefix=f"imsrc-{prefix}-"))


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A private temporary directory for one test (servers started in it are stopped afterwards)."""
    path = _scratch_dir("test")
    yield path
    for data in [path, *path.iterdir()]:
        if (data / "pg").is_dir():
            EmbeddedServer(data).stop()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of a server we may create databases on (maintenance database `postgres`)."""
    external = os.environ.get("IMSRC_TEST_DATABASE_URL")
    if external:
        yield external
        return
    data_dir = _scratch_dir("server")
    server = EmbeddedServer(data_dir)
    info = server.start()
    yield info.url("postgres")
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def create_database(server_url: str) -> Iterator[object]:
    """Factory: a new empty database on the test server; all are dropped at the end of the session."""
    created: list[str] = []

    def _create(prefix: str = "imsrc_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _with_database(server_url, name)

    yield _create
    with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(create_database) -> str:  # type: ignore[no-untyped-def]
    url: str = create_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=_scratch_dir("data"),
        model="open_clip-tiny-test",
        # Test catalogs are tiny: two-stage search is exercised as such; the small-catalog rule has its own test.
        search_two_stage_min_rows=0,
        search_warmup=False,  # a background thread per app would race the tests' own transactions
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture(scope="session")
def database(settings: Settings, database_url: str) -> Iterator[Database]:
    engine = make_engine(database_url)
    db = Database(url=database_url, engine=engine, settings=settings, revision="head", pgvector_version="")
    yield db
    engine.dispose()


@pytest.fixture()
def connection(database: Database) -> Iterator[Connection]:
    with database.engine.connect() as conn:
        trans = conn.begin()
        yield conn
        trans.rollback()


@pytest.fixture()
def session(connection: Connection) -> Iterator[Session]:
    """A session whose commits become savepoints inside the test's outer transaction."""
    with Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False) as sess:
        yield sess


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
