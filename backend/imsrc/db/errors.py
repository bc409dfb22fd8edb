"""What a database error means for the caller: retry the unit of work, try later, fix the input, or a bug.

SQLAlchemy wraps driver errors in DBAPIError subclasses, but COPY goes through psycopg directly, so its errors
arrive unwrapped; and a full connection pool is SQLAlchemy's own TimeoutError. Knowing these types is the
database layer's business: the API and the ingest layer ask `classify` and catch DATABASE_ERRORS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import psycopg
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from imsrc.db.citus import unreachable_node

# Every exception type a database call can raise (catch these, then ask classify()).
DATABASE_ERRORS: tuple[type[Exception], ...] = (DBAPIError, psycopg.Error, PoolTimeoutError)

Kind = Literal["conflict", "busy", "unavailable", "node_unavailable", "invalid_value", "error"]


@dataclass(frozen=True)
class DatabaseFailure:
    """kind: conflict (deadlock or serialization failure: rolled back, run the unit of work again), busy (no
    free connection), unavailable (server or connection gone), node_unavailable (a Citus worker that
    the statement needed did not answer; the coordinator is fine), invalid_value (the database refused a value
    the client sent), error (anything else: a bug or a broken schema). detail: the server's first line."""

    kind: Kind
    detail: str
    node: str | None = None  # node_unavailable: host:port of the Citus node that did not answer


def is_transaction_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure (SQLSTATE class 40): the transaction was rolled back, retry it."""
    orig = getattr(exc, "orig", None) or exc
    return str(getattr(orig, "sqlstate", "") or "").startswith("40")


def classify(exc: BaseException) -> DatabaseFailure:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    detail = lines[0] if lines else type(orig).__name__
    node = unreachable_node(str(orig))
    if node is not None:
        return DatabaseFailure("node_unavailable", detail, node)
    if is_transaction_conflict(exc):
        return DatabaseFailure("conflict", detail)
    if isinstance(exc, PoolTimeoutError):
        return DatabaseFailure("busy", detail)
    if isinstance(exc, (DataError, psycopg.DataError)):
        return DatabaseFailure("invalid_value", detail)
    if isinstance(exc, (OperationalError, psycopg.OperationalError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return DatabaseFailure("unavailable", detail)
    return DatabaseFailure("error", detail)
