"""`imsrc sql`: run one read-only statement as the imsrc_reader role.

We connect *as* the reader instead of `SET ROLE` on the owner's connection: a superuser session can
always switch back (SET ROLE checks the session user), so only a separate login is a real boundary.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from imsrc.config import Settings
from imsrc.errors import ConfigurationError, InvalidInputError

READER_ROLE = "imsrc_reader"


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def reader_url(settings: Settings, owner_url: str) -> str:
    if settings.reader_url:
        return settings.reader_url
    if settings.embedded and settings.reader_password is None:
        # The embedded server trusts only its private unix socket; over TCP the reader needs its own password.
        from imsrc.db.embedded import server_for

        return server_for(settings).login_url(READER_ROLE)
    # The owner's server and database with the reader's login (libpq's own parser: no SQLAlchemy to import).
    from imsrc.db.direct import libpq_url

    params = conninfo_to_dict(libpq_url(owner_url) or owner_url)
    params.pop("password", None)
    params["user"] = READER_ROLE
    return make_conninfo("", **params, password=settings.reader_password)


# Statements PostgreSQL can run behind DECLARE ... CURSOR (a server-side cursor); others (EXPLAIN, SHOW) stream.
CURSOR_STATEMENTS = frozenset({"select", "with", "values", "table"})
BATCH_ROWS = 2000


@dataclass
class RowStream:
    columns: list[str]
    rows: Iterator[tuple[Any, ...]]


def _first_keyword(query: str) -> str:
    text = query
    while True:
        text = text.lstrip().lstrip("(").lstrip()
        if text.startswith("--"):
            text = text.partition("\n")[2]
        elif text.startswith("/*"):
            text = text.partition("*/")[2]
        else:
            break
    return re.split(r"[^A-Za-z_]", text, maxsplit=1)[0].lower()


@contextmanager
def _query_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.SyntaxError as exc:
        if "multiple commands" in str(exc):
            raise InvalidInputError("imsrc sql runs exactly one statement; remove the extra ';'") from exc
        raise InvalidInputError(f"query failed: {_first_line(str(exc))}") from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise InvalidInputError(f"imsrc sql is read-only: {_first_line(str(exc))}") from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise InvalidInputError(
            f"imsrc sql runs as {READER_ROLE}, which may only read the catalog: {_first_line(str(exc))}"
        ) from exc
    except psycopg.ProgrammingError as exc:
        if "didn't produce a result" in str(exc):
            raise InvalidInputError("imsrc sql only runs queries that return rows (SELECT, WITH, ...)") from exc
        raise InvalidInputError(f"query failed: {_first_line(str(exc))}") from exc
    except psycopg.Error as exc:
        raise InvalidInputError(f"query failed: {_first_line(str(exc))}") from exc


@contextmanager
def open_readonly(url: str, query: str) -> Iterator[RowStream]:
    """Run one read-only statement and stream its rows in constant memory (the whole answer is never held:
    30M rows once took 2.1 GB). Rows come from a server-side cursor in batches; statements that cannot stand
    behind a cursor (EXPLAIN, SHOW) stream row by row. Both refuse more than one statement (the query goes
    through the extended protocol, which holds exactly one)."""
    if not query.strip():
        raise InvalidInputError("empty query")
    try:
        conn = psycopg.connect(url, connect_timeout=10, application_name="imsrc sql")
    except psycopg.OperationalError as exc:
        raise ConfigurationError(
            f"cannot connect as the read-only role {READER_ROLE}: {_first_line(str(exc))}; "
            "set IMSRC_READER_URL (or IMSRC_READER_PASSWORD) to a login for that role"
        ) from exc
    with conn:
        conn.read_only = True
        try:
            if _first_keyword(query) in CURSOR_STATEMENTS:
                with conn.cursor(name="imsrc_sql") as cur:
                    cur.itersize = BATCH_ROWS
                    with _query_errors():
                        cur.execute(query.encode())  # bytes: no client-side %-placeholder parsing
                    yield RowStream(columns=[d.name for d in cur.description or []], rows=_guarded(iter(cur)))
            else:
                with conn.cursor() as plain:
                    rows = plain.stream(query.encode())
                    with _query_errors():
                        first = next(rows, None)  # runs the statement: its errors surface here
                    if plain.description is None:
                        raise InvalidInputError("imsrc sql only runs queries that return rows (SELECT, WITH, ...)")
                    head = [first] if first is not None else []
                    yield RowStream(
                        columns=[d.name for d in plain.description], rows=_guarded(itertools.chain(head, rows))
                    )
        finally:
            conn.rollback()


def _guarded(rows: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Errors raised while rows are fetched (a division by zero at row 10,000, the statement timeout) become
    the same one-line errors as those at the start."""
    with _query_errors():
        yield from rows


def run_readonly(url: str, query: str, *, max_rows: int | None = None) -> QueryResult:
    """The whole answer (or its first max_rows rows) in memory: for small queries and tests."""
    with open_readonly(url, query) as stream:
        return QueryResult(columns=stream.columns, rows=list(itertools.islice(stream.rows, max_rows)))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message
