"""The CLI starts fast: torch, open_clip, torchvision and faiss load only in the commands that embed or search.

Importing torch alone takes seconds; the timings are in BENCHMARKS.md ("CLI start", bench/cli/run.py). Here we
check the cause, which does not depend on the machine's load: which modules each command imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from imsrc.config import Settings
from imsrc.db.engine import linear_head, shipped_head
from tests.helpers import ROOT

HEAVY = ("torch", "open_clip", "torchvision", "faiss")
# Not heavy like torch, but ~0.3 s of a command's start: needed only to migrate, not to see the schema is current.
MIGRATOR = "alembic"
# SQLAlchemy (~0.2-0.35 s) and NumPy (~0.15 s, pulled in by pgvector's SQLAlchemy types in the ORM models): the
# commands that only read use a plain psycopg connection (db.direct, catalog.reader) and import neither.
ORM = ("sqlalchemy", "numpy", "pgvector")

# Runs the real `imsrc` entry point and reports, at exit, which heavy modules the command had imported.
PROBE = f"""
import atexit, sys
atexit.register(lambda: sys.stderr.write(
    "\\nHEAVY=" + ",".join(m for m in {(*HEAVY, MIGRATOR, *ORM)!r} if m in sys.modules) + "\\n"))
sys.argv = ["imsrc", *sys.argv[1:]]
from imsrc.cli.main import main
main()
"""


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The command's result, and which of HEAVY, MIGRATOR and ORM it imported."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120
    )
    marker = [line for line in result.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, result.stderr
    heavy = [m for m in marker[-1].removeprefix("HEAVY=").split(",") if m]
    return result, heavy


def test_importing_the_cli_does_not_import_torch() -> None:
    code = f"import imsrc.cli.main, sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_works_without_heavy_imports() -> None:
    result, heavy = _run("--help")
    assert result.returncode == 0 and "search" in result.stdout and "serve" in result.stdout
    assert heavy == []
    result, heavy = _run("search", "image", "--help")
    assert result.returncode == 0 and "--categories" in result.stdout
    assert heavy == []


def test_read_only_commands_do_not_import_the_orm(database_url: str) -> None:
    """The probe can see the ORM when a command uses it (`models list` goes through the full database layer), so
    the empty lists below mean something."""
    result, heavy = _run("models", "list", "--json", env={"IMSRC_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert "sqlalchemy" in heavy and "numpy" in heavy, heavy


def test_the_plain_reader_answers_like_the_orm_repositories(create_database, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """catalog.reader (psycopg, for the quick commands) and the SQLAlchemy repositories (for the API) give the
    same rows with the same Python types."""
    from imsrc.catalog.reader import CatalogReader
    from imsrc.catalog.repository import CategoryRepository, StatsRepository
    from imsrc.db.direct import connect_current
    from imsrc.ingest.repository import JobRepository
    from tests.fixtures.database import fresh_database

    database = fresh_database(create_database, settings, "imsrc_reader")
    with database.session() as session:
        CategoryRepository(session).get_or_create("Cats", description="felines")
        CategoryRepository(session).get_or_create("auto-001", automatic=True)
        session.execute(
            text(
                "INSERT INTO ingest_jobs (kind, job_key, status, paths, options) "
                "VALUES ('index', 'k1', 'completed', ARRAY['/x'], '{\"a\": 1}')"
            )
        )
    with database.session() as session:
        orm = (
            StatsRepository(session).counts(),
            StatsRepository(session).models(),
            CategoryRepository(session).list_with_counts(),
            JobRepository(session).recent(5),
        )
    with connect_current(database.settings) as direct:
        reader = CatalogReader(direct.conn)
        plain = (reader.counts(), reader.models(), reader.categories(), reader.recent_jobs(5))
        assert direct.revision == shipped_head()
    database.dispose()
    assert [len(part) for part in orm[2:]] == [2, 1]
    assert plain == orm


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (("sql", "SELECT 40 + 2 AS answer", "--json"), lambda out: json.loads(out) == [{"answer": 42}]),
        (("stats", "--json"), lambda out: "images" in json.loads(out)["counts"]),
        (("categories", "list", "--json"), lambda out: isinstance(json.loads(out), list)),
        (("jobs", "--json"), lambda out: isinstance(json.loads(out), list)),
    ],
    ids=["sql", "stats", "categories-list", "jobs"],
)
def test_catalog_commands_work_without_heavy_imports(database_url: str, args: tuple[str, ...], check) -> None:  # type: ignore[no-untyped-def]
    result, heavy = _run(*args, env={"IMSRC_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert check(result.stdout), result.stdout
    assert heavy == []  # the database is at head: alembic is not even imported to confirm it, nor SQLAlchemy


def test_db_status_without_heavy_imports(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("cli-start")
    result, heavy = _run("db", "status", "--json", env={"IMSRC_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["running"] is False
    assert heavy == []


def test_an_empty_database_still_migrates(create_database) -> None:  # type: ignore[no-untyped-def]
    # The other side of the fast path: a schema that is behind goes through alembic.
    url = create_database("imsrc_cli_start")
    result, heavy = _run("stats", "--json", env={"IMSRC_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_revision"] == shipped_head()
    assert [m for m in heavy if m not in ORM] == [MIGRATOR]
    # Migrated once: the next command finds the schema current and takes the plain connection.
    result, heavy = _run("stats", "--json", env={"IMSRC_DATABASE_URL": url})
    assert result.returncode == 0 and heavy == [], result.stderr


def test_linear_head_agrees_with_alembic_or_steps_aside(tmp_path: Path) -> None:
    assert linear_head() == shipped_head() is not None
    (tmp_path / "a.py").write_text('revision: str = "a"\ndown_revision: str | None = None\n')
    (tmp_path / "b.py").write_text('revision = "b"\ndown_revision = "a"\n')
    assert linear_head(tmp_path) == "b"
    (tmp_path / "c.py").write_text('revision = "c"\ndown_revision = ("a", "b")\n')  # a merge: alembic's job
    assert linear_head(tmp_path) is None
    (tmp_path / "c.py").write_text('revision = "c"\ndown_revision = "a"\n')  # two heads
    assert linear_head(tmp_path) is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("similar", "abc"), "Invalid value for 'image_id'"),
        (("similar", "4", "-k", "0"), "'-k' / '--k'"),
        (("nosuch",), "No such command 'nosuch'"),
        (("sql",), "Missing argument 'query'"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], expected: str) -> None:
    """A wrong argument prints one `error:` line and exits 2 (Typer's default is a box of several lines)."""
    result, _ = _run(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("HEAVY=")]
    assert result.returncode == 2
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0] and "--help" in lines[0]


def test_no_arguments_prints_the_help() -> None:
    result, _ = _run()
    assert result.returncode == 2 and "Usage:" in result.stdout and "search" in result.stdout
