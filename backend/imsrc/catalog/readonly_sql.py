"""`imsrc sql`: run one read-only statement as the imsrc_reader role.

We connect *as* the reader instead of `SET ROLE` on the owner's connection: a superuser session can
always switch back (SET ROLE checks the session user), so only a separate login is a real boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

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
    url = make_url(owner_url).set(username=READER_ROLE, password=settings.reader_password)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def run_readonly(url: str, query: str, *, max_rows: int = 100_000) -> QueryResult:
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
            with conn.cursor() as cur:
                # A prepared statement cannot hold more than one command: this enforces "one statement".
                cur.execute(query.encode(), prepare=True)  # bytes: no client-side %-placeholder parsing
                if cur.description is None:
                    raise InvalidInputError("imsrc sql only runs queries that return rows (SELECT, WITH, ...)")
                columns = [d.name for d in cur.description]
                rows = cur.fetchmany(max_rows)
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
        except psycopg.Error as exc:
            raise InvalidInputError(f"query failed: {_first_line(str(exc))}") from exc
        finally:
            conn.rollback()
    return QueryResult(columns=columns, rows=rows)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message
