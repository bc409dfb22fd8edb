"""The query vector as PostgreSQL reads it: pgvector's text form, and a binary form for the statements that take
it untyped."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form. Nine significant digits identify a float32 exactly (FLT_DECIMAL_DIG), and pgvector
    reads each element with strtof, so PostgreSQL gets the very same vector (and halfvec) as from the 17-digit
    repr of each value used before, from text a third shorter, formatted by one C-level % (1280-d: ~0.6 vs
    ~1.5 ms per literal on the loaded bench machine; checked equal in PostgreSQL on 600 vectors of scales
    1e-30 to 1e30)."""
    values = np.asarray(vector, dtype=np.float32).ravel().tolist()
    return _literal_format(len(values)) % tuple(values)


@lru_cache(maxsize=16)
def _literal_format(dimension: int) -> str:
    return "[" + ",".join(["%.9g"] * dimension) + "]"


class QueryVector:
    """A search's query vector, bound in pgvector's binary form: nothing to format here or to parse in the server
    (a 1280-d vector_literal cost ~0.28 ms per statement, formatting and parsing, the binary form ~0.03). Bound
    untyped, it takes the type of the statement's first cast of it, which must be to vector (search.pg_queries.
    query_as; vector_recv then checks the dimension). Reads that hand the query on as text (Citus) use .text."""

    __slots__ = ("_text", "values")

    def __init__(self, vector: np.ndarray) -> None:
        self.values = np.asarray(vector, dtype=np.float32).ravel()
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = vector_literal(self.values)
        return self._text


def query_text(query: str | QueryVector) -> str:
    """pgvector's text form of a query, for statements that bind it as text."""
    return query if isinstance(query, str) else query.text


class _QueryVectorDumper(Dumper):
    """vector_send's layout: int16 dimension, int16 unused, big-endian float4s. oid 0: the server types it."""

    format = Format.BINARY

    def dump(self, obj: QueryVector) -> bytes:
        values = obj.values
        return len(values).to_bytes(2, "big") + b"\0\0" + values.astype(">f4").tobytes()


def register() -> None:
    """psycopg's default adapters bind QueryVector from now on, for every connection made after: db.engine.
    make_engine calls this first (a connection copies the adapters when it is made, so one made before could not
    bind one). Registering again replaces the same dumper."""
    psycopg.adapters.register_dumper(QueryVector, _QueryVectorDumper)
