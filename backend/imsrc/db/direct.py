"""A plain psycopg connection for the CLI's read-only commands (`stats`, `categories list`, `jobs`, `sql`).

Those commands run a query or two and exit, so their start is most of their time. The full Database (db.session)
imports SQLAlchemy, and the ORM models import NumPy through pgvector: ~0.5 s of imports on these machines before
the first query. Here the same checks run on one psycopg connection: the server is resolved (and the embedded one
started) as always, pgvector must be there and the schema at the shipped head. Anything else (a schema behind, a
URL psycopg cannot take as it is, no pgvector) goes through the full open_database once, which migrates or fails
with its usual message, and then the connection is made again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row

from imsrc.config import Settings
from imsrc.db.revisions import MIN_PGVECTOR, PGVECTOR_VERSION_SQL, linear_head, parse_version
from imsrc.errors import DatabaseUnavailableError

LIBPQ_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10


@dataclass
class DirectConnection:
    """The owner's connection, read-only, rows as dicts; `url` the libpq URL it came from."""

    url: str
    revision: str
    conn: psycopg.Connection[dict[str, Any]]


def libpq_url(url: str) -> str | None:
    """`url` as libpq takes it (postgresql+psycopg:// loses its driver name), or None when it is not a
    PostgreSQL URL at all (the full path then says what is wrong with it)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() not in LIBPQ_SCHEMES:
        return None
    return "postgresql://" + rest


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _resolve(settings: Settings) -> str | None:
    if settings.database_url:
        return libpq_url(settings.database_url)
    from imsrc.db.embedded import server_for

    return server_for(settings).start().url()


def _connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    try:
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name="imsrc", row_factory=dict_row)
    except psycopg.OperationalError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise DatabaseUnavailableError(
            f"cannot connect to the database at {describe(url)} (IMSRC_DATABASE_URL): {lines[0] if lines else exc}"
        ) from exc
    conn.read_only = True  # these commands only read; a slip in a repository fails instead of writing
    return conn


def _current(conn: psycopg.Connection[dict[str, Any]]) -> str | None:
    """The schema revision when the database is ready for imsrc as it is (pgvector >= 0.8, schema at the shipped
    head), else None."""
    row = conn.execute(PGVECTOR_VERSION_SQL).fetchone()
    version = next(iter(row.values())) if row else None
    if version is None or parse_version(str(version)) < MIN_PGVECTOR:
        return None
    if conn.execute("SELECT to_regclass('alembic_version') AS t").fetchone() == {"t": None}:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    revision = row["version_num"] if row else None
    return revision if revision is not None and revision == linear_head() else None


@contextmanager
def connect_current(settings: Settings) -> Iterator[DirectConnection]:
    """A read-only connection to a catalog at the shipped schema (migrated first if it was behind, as every
    command does unless IMSRC_AUTO_MIGRATE=false)."""
    resolved = _resolve(settings)
    revision = None
    if resolved is not None:
        url = resolved
        conn = _connect(url)
        try:
            revision = _current(conn)
        except BaseException:
            conn.close()
            raise
        if revision is None:
            conn.close()
    if revision is None:
        from imsrc.db.session import open_database

        database = open_database(settings)  # migrates, or raises the one-line error saying why not
        database.dispose()
        url = libpq_url(database.url) or database.url
        revision = database.revision
        conn = _connect(url)
    with conn:
        yield DirectConnection(url=url, revision=revision, conn=conn)
