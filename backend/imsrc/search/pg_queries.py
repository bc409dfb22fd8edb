"""Stage-2 SQL on pgvector, and the per-category HNSW indexes it relies on.

Why per-category partial indexes: a category filter on the one per-model HNSW index is a post-filter (the
graph walk finds ef_search candidates, then the filter drops most of them: 0.3 rows of 10 in the design
probe), and iterative scans still reach only recall 0.07-0.19 on categories far from the query. A partial
HNSW index per (model, category) holds only that category's rows, so its walk never wastes candidates, and
a UNION ALL of one `ORDER BY ... LIMIT n` per chosen category returns n rows from each whatever the query.
Small categories get no index: an exact scan of a few thousand rows via the (model_id, category_id) btree
is as fast and exact (threshold chosen by bench/search/run.py, see BENCHMARKS.md).

Where the per-category indexes live (migration 0013_category_vectors): PostgreSQL builds any index, partial or
not, by reading its whole table, so a partial index on `embeddings` cost O(catalog) per category. On plain
PostgreSQL each indexed category's vectors are also kept (half precision, by a trigger on embeddings) in its own
partition of `category_vectors`, and its index is built there: O(that category's rows). A walk reads the
partition's index and scores the rows it found from the partition (half precision, see _union). On Citus, embeddings is
already split by category into shards, and the partial index on embeddings is built per shard.

The per-category indexes hold half-precision copies (category_index_expr) with the inner-product opclass
(vectors are unit length, so the order equals cosine order); a partition's rows are scored at half precision,
other branches at full precision (see _union). The per-model index (halfvec too, catalog.repository.embedding_expr)
uses cosine, so it can never serve a per-category `<#>` ordering: the plan is decided by
construction, not by the planner's cost guess. Exact branches order by `(... <=> q) + 0`, which no index
can serve. enable_sort/enable_seqscan are switched off (locally) so each branch takes its index.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from imsrc.catalog.locks import WriteLocks
from imsrc.catalog.repository import embedding_expr, global_index_name, legacy_global_expr
from imsrc.db.citus import (
    category_partitions,
    category_read_delegated,
    category_workers,
    distributed,
    local_relations,
    sequential_shard_commands,
    worker_unreachable,
)
from imsrc.db.engine import side_engine
from imsrc.db.vectors import QueryVector, query_text

Hit = tuple[int, float]  # (image_id, cosine similarity)
# Denser graphs than pgvector's default (m 16, ef_construction 64): inside one category the true neighbours are
# nearly tied, and the default graph reached recall@10 ~0.91 there (bench/search); same shape as FAISS's.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_MAX = 1000  # pgvector's own upper bound for hnsw.ef_search


def walk_settings(ef_search: int, limit: int) -> dict[str, str]:
    """Settings for one HNSW statement that must return `limit` rows. The walk is at least `limit` wide, but
    pgvector refuses an ef_search over 1000 (k 668-1000 asks for up to 1,500 rows with the duplicate margin),
    so past that the iterative scan continues the walk until `limit` rows are found. For limits up to
    ef_search it changes nothing: the first batch of candidates is returned in order, as without it.
    enable_sort and enable_seqscan are off so that each branch takes its index (module docstring)."""
    return {
        "hnsw.ef_search": str(min(EF_SEARCH_MAX, max(ef_search, limit))),
        "hnsw.iterative_scan": "relaxed_order",
        "enable_sort": "off",
        "enable_seqscan": "off",
    }


@dataclass(frozen=True)
class WalkWidth:
    """A category's calibrated walk (search/walks.py): `ef` reached `recall` of the exact top 10 for sampled
    members when the category's index held `rows` rows."""

    ef: int
    rows: int
    recall: float = 1.0


def calibrated_ef(width: WalkWidth, rows: int) -> int:
    """The calibrated ef, widened by sqrt(growth) while the category has grown since it was calibrated (the
    size rule's law, until search sync calibrates it again). imsrc._walk_ef (migration 0014) computes the
    same float8 arithmetic, so the SQL functions walk exactly as wide."""
    grown = max(1.0, rows / max(width.rows, 1))
    return min(EF_SEARCH_MAX, math.ceil(width.ef * math.sqrt(grown)))


def category_ef_search(rows: int, base: int, *, near: bool, width: WalkWidth | None = None) -> int:
    """hnsw.ef_search for a walk through one category's graph.

    Near (the query lies in or beside the category, i.e. stage 1 would pick it) and calibrated: the width
    search sync measured on the category's own members (search/walks.py). On real embeddings it is far
    narrower than the size rule below: 500k Fashion-MNIST-calibrated rows, 50k per category, were walked at
    ef 448 (17.6 ms for one category) while the global graph reached recall 1.000 at ef 40.
    Near, not calibrated yet: at least `base` and 2 sqrt(rows), because the walk must rank more nearly-tied
    rows as a category grows; on 10,000 isotropic 512-d rows ef 100 reached recall@10 0.92 and ef 200 0.98
    (bench/search). Far (an explicit filter names a category the query is not like): every row is about
    equally far, the greedy walk has no gradient to follow, and only a wide candidate list finds the best
    ones (ef 300: 0.81, ef 1000: 0.96 at ~9 ms per 10,000 rows), so far categories get the maximum.
    """
    if not near:
        return EF_SEARCH_MAX
    if width is not None:
        return calibrated_ef(width, rows)
    return min(EF_SEARCH_MAX, max(base, math.ceil(2 * math.sqrt(max(rows, 0)))))


# A category the query is not like, with fewer rows than this, is scanned exactly even when it has an index:
# a 1,000-row category took 2.5 ms exact and 2.8 ms through a 1000-wide walk; 10,000 rows 23 vs 11 ms.
FAR_EXACT_MAX_ROWS = 2000


def branch_plan(
    indexed: Mapping[int, int],
    categories: Sequence[int],
    near: Container[int],
    base: int,
    widths: Mapping[int, WalkWidth] | None = None,
) -> tuple[list[tuple[int, bool]], int]:
    """How to search each chosen category (through its index or exactly) and the statement's ef_search.

    `indexed`: category -> rows of its HNSW index; `widths`: the calibrated walks. One statement searches
    every chosen category, so it gets one ef_search: the widest any of its index branches needs."""
    widths = widths or {}
    plan = [(c, c in indexed and (c in near or indexed[c] >= FAR_EXACT_MAX_ROWS)) for c in categories]
    ef = max(
        (category_ef_search(indexed[c], base, near=c in near, width=widths.get(c)) for c, walk in plan if walk),
        default=base,
    )
    return plan, ef


LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a NOWAIT lock that is held by another transaction
INDEX_PREFIX = "ix_embeddings_hv"  # per-category indexes on halfvec
LEGACY_PREFIXES = ("ix_embeddings_ip",)  # earlier per-category indexes (full-precision vector), replaced on sync
HALFVEC_MAX_DIM = 4000  # pgvector indexes halfvec up to 4,000 dimensions


def category_index_name(model_id: int, category_id: int) -> str:
    return f"{INDEX_PREFIX}_m{int(model_id)}_c{int(category_id)}"


def partition_name(category_id: int) -> str:
    """The category's partition of category_vectors (migration 0013), where its indexes are built."""
    return f"category_vectors_c{int(category_id)}"


def category_index_expr(dimension: int) -> str:
    """Per-category graphs hold half-precision copies: a walk reads one element per visited neighbour, and at
    1M rows (100 categories, 512-d) halving those reads took a 10,000-row category from ~7 to ~5.5 ms at the
    same recall (bench/search). A walk on a partition is scored from the partition's row (half precision, see
    _union); elsewhere (Citus, legacy indexes) the outer query scores the few rows found at full precision."""
    return f"(embedding::halfvec({int(dimension)}))"


def _halfvec(dimension: int) -> str:
    return f"halfvec({int(dimension)})"


def query_as(kind: str, dimension: int | None = None) -> str:
    """The query vector :q in a statement, as `kind` (vector or halfvec). Bound untyped, a parameter takes the type
    of the first cast PostgreSQL analyses: every use here casts it to vector first, so it is read once per
    statement (a 1280-d text parsed once, not once per use: ~0.09 ms each; a walk over 3 categories had six) and a
    halfvec is that vector rounded, the same numbers as the halfvec the text gave (600 vectors of scales 1e-8 to
    1e4 compared in PostgreSQL). Before, :q was cast to text first, for the same reason: the halfvec cast inside
    FROM was analysed first and the full-precision re-sort used a half-precision query."""
    vector = f"CAST(:q AS vector({int(dimension)}))" if dimension else "CAST(:q AS vector)"
    if kind == "vector":
        return vector
    if dimension is None:
        raise ValueError("a halfvec query needs its dimension")
    return f"CAST({vector} AS {_halfvec(dimension)})"


def _half_score(dimension: int) -> str:
    """A walked category's score from the half-precision copy its graph holds (a partition's row, or on Citus the
    cast of the row's vector: the same numbers), the query as query_as gives it."""
    return f"1 - ({category_index_expr(dimension)} <=> {query_as('halfvec', dimension)})"


def _psycopg(sql: str) -> str:
    """The statements here bind the query vector as :q (SQLAlchemy); citus_read hands them to psycopg."""
    return sql.replace(":q", "%(q)s")


@dataclass(frozen=True)
class HitInfo:
    id: int
    category_id: int | None
    category: str | None
    canonical_id: int | None
    duplicates: int
    original_name: str | None = None
    width: int | None = None
    height: int | None = None
    byte_size: int | None = None
    caption: str | None = None


_SETTING_NAME = re.compile(r"[a-z_.]+")
_SETTING_VALUE = re.compile(r"[a-z0-9_]+")


def _set_local(name: str, value: str) -> str:
    if not _SETTING_NAME.fullmatch(name) or not _SETTING_VALUE.fullmatch(value):
        raise ValueError(f"unexpected setting {name}={value!r}")
    return f"SET LOCAL {name} = '{value}'"


def _side_read(
    engine: Engine, read: Callable[[Any], list[Any]], *, autocommit: bool = False, pool: Engine | None = None
) -> list[Any]:
    """`read(psycopg connection)` on a connection of the side pool (db.engine.side_engine), or of `pool` (a Citus
    worker's, db.citus.category_workers). Those pools do not ping a connection before handing it out (a round trip
    per stage-2 statement, ~0.3-0.6 ms of a 1-category search on the bench machine): a connection the server
    dropped since (a restart) fails its first statement as `broken`, and the read, which changes nothing, runs once
    more on a new connection. Failing to connect raises SQLAlchemy's OperationalError; the read's own errors come
    from psycopg."""
    for attempt in (1, 2):
        with (pool or side_engine(engine)).connect() as conn:
            if autocommit:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            raw: Any = conn.connection.driver_connection
            try:
                return read(raw)
            except psycopg.OperationalError:
                if attempt == 2 or not raw.broken:
                    raise
                conn.invalidate()
    raise AssertionError("unreachable")


def citus_read(engine: Engine, sql: str, params: Mapping[str, str], settings: Mapping[str, str]) -> list[Any]:
    """One read on a pooled connection of its own, with `settings` in force on the workers that run it.

    Citus plans each shard's query on its worker: set_config() stays on the coordinator, but a SET LOCAL is
    passed on to the workers' transactions when citus.propagate_set_commands is 'local'. The SETs, the query
    and the ROLLBACK go as one pipeline: one round trip from here (the settings used to cost a round trip
    each, and their restore one more to every worker in the transaction: ~7 ms of a 1-category search,
    BENCHMARKS "Citus"), and nothing is left to restore. Still three round trips from the coordinator to each
    worker (BEGIN with the SETs, the query, ROLLBACK): a one-category read goes through citus_category_read.
    `sql` uses psycopg placeholders (%(name)s). Read-only and on another connection: it sees what is committed,
    as the search's own transaction does."""

    def read(raw: Any) -> list[Any]:
        with raw.pipeline():
            raw.execute(_set_local("citus.propagate_set_commands", "local"))
            for name, value in settings.items():
                raw.execute(_set_local(name, value))
            cursor = raw.execute(sql, dict(params))
            raw.rollback()
        return list(cursor.fetchall())

    return _side_read(engine, read)


CATEGORY_READ = "SELECT image_id, score FROM imsrc._category_read(%(c)s, %(sql)s, %(q)s, %(names)s, %(values)s)"


def citus_category_read(
    engine: Engine, category_id: int, sql: str, query: str, settings: Mapping[str, str]
) -> list[Any]:
    """One category's read on Citus: imsrc._category_read (db/citus.py, CITUS_CATEGORY_READ) sets `settings` and
    runs `sql` on the category's shard, on the worker that holds it. Sent to that worker directly where the
    service can connect there (db.citus.category_workers), else to the coordinator outside a transaction block,
    which delegates the whole call to that worker (one round trip on from the coordinator). `sql` must read only
    this category's rows, name the table as `FROM embeddings`, and use psycopg's %(q)s placeholder for the query
    vector (text). Same rows as citus_read; ~1.5 vs ~3-4 ms for one small category's walk at load 8 (interleaved
    A/B, BENCHMARKS "Citus"), and ~1-1.5 ms less again without the coordinator's hop."""
    params = {
        "c": int(category_id),
        "sql": sql.replace("%(q)s", "$1"),
        "q": query,
        "names": list(settings),
        "values": list(settings.values()),
    }

    def read(raw: Any) -> list[Any]:
        return list(raw.execute(CATEGORY_READ, params).fetchall())

    worker = category_workers(engine, [category_id])[int(category_id)]
    if worker is not None:
        try:
            return _side_read(engine, read, autocommit=True, pool=worker)
        except OperationalError:  # could not connect to the worker: through the coordinator (a down worker's 503)
            worker_unreachable(worker)
    return _side_read(engine, read, autocommit=True)


PARALLEL_BRANCHES_MAX = 32  # stage-2 statements in flight at once in one process, all Citus searches together
_BRANCHES: tuple[int, ThreadPoolExecutor] | None = None
_BRANCHES_GUARD = threading.Lock()


def _branch_pool() -> ThreadPoolExecutor:
    """Threads for Citus stage-2 branches, made once per process (a pool made per search cost as much as the
    parallelism won: 3 one-category reads took 6.2 ms in a new pool, 6.3 ms one after another, 4.3 ms in a kept
    one). Per process: a forked worker must not inherit its parent's threads."""
    global _BRANCHES
    with _BRANCHES_GUARD:
        if _BRANCHES is None or _BRANCHES[0] != os.getpid():
            _BRANCHES = (os.getpid(), ThreadPoolExecutor(PARALLEL_BRANCHES_MAX, thread_name_prefix="imsrc-stage2"))
        return _BRANCHES[1]


def _citus_reads(
    engine: Engine,
    statements: Sequence[tuple[int, str]],
    query: str,
    settings: Mapping[str, str],
    delegated: bool,
) -> list[Any]:
    """Each (category, statement) read on a connection of its own (citus_category_read, or citus_read where the
    catalog lacks the delegated function), at once when there are several (their rows together): Citus runs the
    legs of a UNION ALL one after another, as subplans, so several categories' workers walk their graphs at
    the same time only when each leg is a statement of its own. The first runs in this thread."""

    def read(item: tuple[int, str]) -> list[Any]:
        category_id, sql = item
        if delegated:
            return citus_category_read(engine, category_id, sql, query, settings)
        return citus_read(engine, sql, {"q": query}, settings)

    if delegated:
        category_workers(engine, [category_id for category_id, _ in statements])  # one look-up for all, if any
    others = [_branch_pool().submit(read, item) for item in statements[1:]]
    rows = read(statements[0])
    for future in others:
        rows += future.result()
    return rows


@contextmanager
def local_settings(session: Session, settings: Mapping[str, str]) -> Iterator[None]:
    """Planner settings for one query, restored afterwards (two round trips, not one per setting)."""
    names = list(settings)
    # missing_ok: pgvector's hnsw.* settings do not exist in a backend that has not loaded the vector
    # library yet (a fresh pooled connection whose first statement this is); restoring NULL resets them.
    get = ", ".join(f"current_setting(:n{i}, true)" for i in range(len(names)))
    put = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(names)))
    params = {f"n{i}": n for i, n in enumerate(names)}
    before = session.execute(
        text(f"SELECT {get}, {put}"), {**params, **{f"v{i}": settings[n] for i, n in enumerate(names)}}
    ).one()
    try:
        yield
    finally:
        session.execute(text(f"SELECT {put}"), {**params, **{f"v{i}": before[i] for i in range(len(names))}})


def read_with_settings(session: Session, sql: str, params: Mapping[str, Any], settings: Mapping[str, str]) -> list[Any]:
    """The rows of one read on the session's connection with `settings` in force for it alone, in one round trip
    (local_settings takes three: read and set, the query, restore). Sent as one pipeline: SAVEPOINT, a SET LOCAL
    per setting, the query, ROLLBACK TO SAVEPOINT (which puts every setting back as it was before, so nothing
    else in the unit of work runs with them) and RELEASE. The read changes nothing, so rolling it back loses
    nothing. `sql` binds :q style parameters (converted for psycopg here)."""
    raw: Any = session.connection().connection.driver_connection
    statement = sql
    for name in params:
        statement = statement.replace(f":{name}", f"%({name})s")
    with raw.pipeline():
        raw.execute("SAVEPOINT imsrc_read_settings")
        for name, value in settings.items():
            raw.execute(_set_local(name, value))
        cursor = raw.execute(statement, dict(params))
        raw.execute("ROLLBACK TO SAVEPOINT imsrc_read_settings")
        raw.execute("RELEASE SAVEPOINT imsrc_read_settings")
    return list(cursor.fetchall())


# Indexes of the vectors: on embeddings, or on a partition of category_vectors (absent on Citus: NULL parent).
ON_VECTOR_TABLES = (
    "(x.indrelid = 'embeddings'::regclass OR x.indrelid IN (SELECT inhrelid FROM pg_inherits "
    "WHERE inhparent = to_regclass('category_vectors')))"
)


class NeighbourRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # ------------------------------------------------------------------ per-category indexes
    def _embedding_indexes(self, like: str) -> list[tuple[str, float]]:
        """(name, reltuples) of the indexes on embeddings, or on a partition of category_vectors, whose name
        matches a LIKE pattern."""
        rows = self.session.execute(
            text(
                "SELECT c.relname, c.reltuples FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                f"WHERE {ON_VECTOR_TABLES} AND c.relname LIKE :p"
            ),
            {"p": like},
        )
        return [(str(name), float(tuples)) for name, tuples in rows]

    def partitions(self) -> bool:
        """Whether per-category indexes live on category_vectors' partitions (plain PostgreSQL since 0013)."""
        return category_partitions(self.session)

    def category_indexes(self, model_id: int) -> dict[int, int]:
        """Categories that have a per-category HNSW index, with the rows it held when last built/analysed."""
        prefix = f"{INDEX_PREFIX}_m{int(model_id)}_c"
        out: dict[int, int] = {}
        for name, tuples in self._embedding_indexes(prefix + "%"):
            match = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
            if match:
                out[int(match.group(1))] = max(int(tuples), 0)
        if out and distributed(self.session):
            # On Citus the coordinator's index is on an empty shell table; the rows are on the shards. The mean
            # prototypes (a reference table, read on the coordinator) count each category's members: asking the
            # shards instead would fail every search while any worker is down.
            out = {c: self.member_counts(model_id).get(c, 0) for c in out}
        return out

    def member_counts(self, model_id: int) -> dict[int, int]:
        """Vectors per category as the mean prototypes last counted them (search sync keeps them current)."""
        return {
            int(c): int(n)
            for c, n in self.session.execute(
                text(
                    "SELECT category_id, member_count FROM category_prototypes WHERE model_id = :m AND kind = 'mean'"
                    " AND ordinal = 0"
                ),
                {"m": int(model_id)},
            )
        }

    def legacy_category_indexes(self, model_id: int) -> list[str]:
        return sorted(
            name for prefix in LEGACY_PREFIXES for name, _ in self._embedding_indexes(f"{prefix}_m{int(model_id)}_c%")
        )

    def _partition_made(self, category_id: int) -> bool:
        """Asked of pg_class with this statement's snapshot: it sees a partition another transaction committed a
        moment ago (to_regclass, which imsrc._category_partition uses, may answer from this backend's catalog
        cache, and creating a partition twice failed with a unique violation in pg_type)."""
        return bool(
            self.session.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_class"
                    " WHERE relname = :p AND relnamespace = 'public'::regnamespace)"
                ),
                {"p": partition_name(category_id)},
            ).scalar()
        )

    def create_category_index(self, model_id: int, dimension: int, category_id: int) -> bool:
        """Build one category's index; False when writers in flight hold the table it needs, or another
        transaction is making partitions (tried again at the next sync; until then the category is scanned
        exactly, which gives the same results)."""
        if self.partitions():
            # The category's partition (filled from embeddings through the (model_id, category_id) btree), then
            # the index on it: both read only this category's rows. Both need a SHARE lock (on embeddings while
            # the partition is filled, on the partition for the index), which waits for every writer in flight;
            # taken inside an upload's unit of work that holds the category locks those writers wait for, waiting
            # would deadlock (tests/test_upload_locking.py). So the lock is asked for without waiting.
            exists = self._partition_made(category_id)
            if not exists:
                # Two models' builds may want the same new partition at once (the index lock is per model): one
                # transaction at a time makes partitions (ATTACH PARTITION allows no more anyway), and it may
                # have just made this one.
                if not WriteLocks(self.session).try_category_partitions():
                    return False
                exists = self._partition_made(category_id)
            target = partition_name(category_id) if exists else "embeddings"
            try:
                with self.session.begin_nested():
                    self.session.execute(text(f"LOCK TABLE {target} IN SHARE MODE NOWAIT"))
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                    return False
                raise
            if not exists:
                self.session.execute(text("SELECT imsrc._create_category_partition(:c)"), {"c": int(category_id)})
            self.session.execute(
                text(
                    f"CREATE INDEX IF NOT EXISTS {category_index_name(model_id, category_id)} ON "
                    f"{partition_name(category_id)} USING hnsw ({category_index_expr(dimension)} halfvec_ip_ops) "
                    f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) WHERE model_id = {int(model_id)}"
                )
            )
            return True
        sequential_shard_commands(self.session)
        self.session.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS {category_index_name(model_id, category_id)} ON embeddings "
                f"USING hnsw ({category_index_expr(dimension)} halfvec_ip_ops) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) "
                f"WHERE model_id = {int(model_id)} AND category_id = {int(category_id)}"
            )
        )
        return True

    def drop_category_index(self, model_id: int, category_id: int) -> None:
        # The category's partition stays (kept current by the trigger, reused if the category grows again):
        # dropping it would take an ACCESS EXCLUSIVE lock on category_vectors to the end of this unit of work,
        # which uploads' triggers write to. `imsrc maintenance`-style clean-up of empty ones: db/README.md.
        self.drop_index(category_index_name(model_id, category_id))

    def drop_model_indexes(self, model_id: int) -> None:
        """Every per-category index of one model (current and legacy), e.g. before the model is removed: they
        are partial indexes on `model_id = N`, so deleting the model's rows would leave them behind, empty."""
        for category_id in self.category_indexes(model_id):
            self.drop_category_index(model_id, category_id)
        for name in self.legacy_category_indexes(model_id):
            self.drop_index(name)

    def drop_index(self, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"unexpected index name {name!r}")
        sequential_shard_commands(self.session)
        self.session.execute(text(f"DROP INDEX IF EXISTS {name}"))

    # ------------------------------------------------------------------ neighbour queries
    @contextmanager
    def _plan(self, **settings: str) -> Iterator[None]:
        """Planner settings for one query, restored afterwards (two round trips, not one per setting)."""
        if distributed(self.session):
            with self._plan_citus(settings):
                yield
            return
        with local_settings(self.session, settings):
            yield

    @contextmanager
    def _plan_citus(self, settings: dict[str, str]) -> Iterator[None]:
        """On Citus the workers plan each shard's query: set_config() stays on the coordinator, but SET LOCAL
        is passed on to the workers' transactions when citus.propagate_set_commands is 'local'."""
        names = ["citus.propagate_set_commands", *settings]
        wanted = {"citus.propagate_set_commands": "local", **settings}
        before = self.session.execute(
            text("SELECT " + ", ".join(f"current_setting(:n{i}, true)" for i in range(len(names)))),
            {f"n{i}": n for i, n in enumerate(names)},
        ).one()

        def apply(values: Sequence[str | None]) -> None:
            parts = []
            for name, value in zip(names, values, strict=True):
                if not re.fullmatch(r"[a-z_.]+", name):
                    raise ValueError(f"unexpected setting {name!r}")
                parts.append(
                    f"SET LOCAL {name} TO DEFAULT"
                    if value is None
                    else f"SET LOCAL {name} = '{str(value).replace(chr(39), chr(39) * 2)}'"
                )
            # The propagation switch first on the way in, last on the way out.
            for part in parts if values is not before else reversed(parts):
                self.session.execute(text(part))

        apply([wanted[n] for n in names])
        # Restored only after success: a failed statement (a worker down) aborts the transaction, which drops the
        # SET LOCALs itself, and a restore would replace the real error with "current transaction is aborted".
        yield
        apply(before)

    def per_category(
        self,
        model_id: int,
        dimension: int,
        query: str | QueryVector,
        categories: Sequence[tuple[int, bool]],
        limit: int,
        ef_search: int,
        *,
        in_session: bool = False,
        full_scores: bool = False,
    ) -> list[Hit]:
        """Top `limit` over the union of categories; each (category_id, indexed) says which branch to use.
        in_session: on Citus too, read through this session's transaction (search/walks.py calibrates an index
        its own unit of work may have just built, which other connections cannot see yet). full_scores: see
        _union."""
        if not categories:
            return []
        sql, expr, q, orders = self._union(model_id, dimension, categories, limit, full_scores=full_scores)
        settings = walk_settings(ef_search, limit)
        engine = self.session.get_bind()
        if isinstance(engine, Engine) and distributed(self.session) and not in_session:
            # One router query per category, each on its own connection (citus_read), merged here in the
            # order the UNION below sorts by: the same rows, the same scores, in the same order. Flat (no
            # subquery) so that Citus plans it on its fast path for single-shard queries.
            # A walked category is scored as on one node, from the half-precision copy its graph holds (the same
            # numbers as a partition's row, so the same order); exact branches at full precision.
            scores = [
                _psycopg(_half_score(dimension)) if indexed and not full_scores else f"1 - ({expr} <=> {_psycopg(q)})"
                for _, indexed in categories
            ]
            statements = [
                (
                    category_id,
                    f"SELECT image_id, {score} AS score FROM embeddings "
                    f"WHERE model_id = {int(model_id)} AND category_id = {int(category_id)} "
                    f"ORDER BY {_psycopg(order)} LIMIT {int(limit)}",
                )
                for (category_id, _), order, score in zip(categories, orders, scores, strict=True)
            ]
            found = _citus_reads(engine, statements, query_text(query), settings, category_read_delegated(self.session))
            return sorted(((int(r[0]), float(r[1])) for r in found), key=lambda h: (-h[1], h[0]))[:limit]
        rows = read_with_settings(self.session, sql, {"q": query}, settings)  # one round trip, not three
        return [(int(r[0]), float(r[1])) for r in rows]

    def global_index_rows(self, model_id: int) -> int | None:
        """About how many rows the model's own HNSW graph (mode `ann`) holds, None without one: its categorised
        vectors as the mean prototypes counted them at the last search sync. A cheap read, for telling when the
        graph's calibrated width is out of date (rows doubled or halved); the index's own reltuples stays 0 on an
        index made empty at registration until a VACUUM, and on a Citus coordinator's shell table."""
        if not self._embedding_indexes(global_index_name(model_id)):
            return None
        return sum(self.member_counts(model_id).values())

    def global_walks_index(self, model_id: int, dimension: int, query: str, limit: int, *, half: bool = True) -> bool:
        """Whether global_ann walks the model's HNSW graph in this session (see walks_index). On Citus global_ann
        reads on connections of its own, which see the committed indexes of every shard: nothing to ask. (An
        EXPLAIN of it through the calibration's session, its settings sent to the workers, failed there with
        "failure on connection marked as essential" in tests/test_citus.py.)"""
        if distributed(self.session):
            return True
        sql, settings = self._global_ann_sql(model_id, dimension, limit, limit, half)
        return self._plan_walks(sql, settings, query, global_index_name(model_id))

    def walks_index(self, model_id: int, dimension: int, category_id: int, query: str, limit: int) -> bool:
        """Whether per_category(in_session=True) walks the category's own HNSW index in this session. An index
        built by this unit of work is not always usable in it (PostgreSQL's indcheckxmin after HOT updates), and
        without it enable_sort=off still ends in an exact sort: a calibration would then measure exact answers."""
        sql, _, _, _ = self._union(model_id, dimension, [(category_id, True)], limit)
        return self._plan_walks(sql, walk_settings(limit, limit), query, category_index_name(model_id, category_id))

    def _plan_walks(self, sql: str, settings: Mapping[str, str], query: str, index: str) -> bool:
        """Whether the plan of `sql` under `settings` in this session scans `index` (on Citus the shard's copy
        of an index carries the shard id: ix_embeddings_hv_m1_c3_102008)."""
        with self._plan(**settings):
            plan = "\n".join(str(r[0]) for r in self.session.execute(text("EXPLAIN " + sql), {"q": query}))
        return re.search(rf"Index Scan using {re.escape(index)}(_\d+)?\b", plan) is not None

    def per_category_hydrated(
        self,
        model_id: int,
        dimension: int,
        query: str | QueryVector,
        categories: Sequence[tuple[int, bool]],
        limit: int,
        ef_search: int,
    ) -> tuple[list[Hit], dict[int, HitInfo]]:
        """per_category() and hydrate() of its hits in one statement (one round trip fewer per two-stage search):
        the same union as a subquery (its LIMIT keeps it one, planned as before), the hits' rows joined to it, in
        its order. On Citus, the two reads."""
        if not categories or distributed(self.session):
            hits = self.per_category(model_id, dimension, query, categories, limit, ef_search)
            return hits, self.hydrate([h[0] for h in hits])
        union, _, _, _ = self._union(model_id, dimension, categories, limit)
        sql = (
            f"SELECT n.image_id, n.score, {HYDRATE_COLUMNS} FROM ({union}) n"
            f" LEFT JOIN {HYDRATE_FROM} ON i.id = n.image_id ORDER BY n.score DESC, n.image_id"
        )
        settings = walk_settings(ef_search, limit)
        rows = read_with_settings(self.session, sql, {"q": query}, settings)
        return [(int(r[0]), float(r[1])) for r in rows], {int(r[0]): _hit_info(r[2:]) for r in rows if r[2] is not None}

    def _union(
        self,
        model_id: int,
        dimension: int,
        categories: Sequence[tuple[int, bool]],
        limit: int,
        *,
        full_scores: bool = False,
    ) -> tuple[str, str, str, list[str]]:
        """The one statement over the chosen categories: (sql, scoring expression, query cast, each branch's
        ORDER BY). full_scores: score a partition's walk from embeddings too (the same rows, one more read each),
        for a calibration that compares scores with exact ones."""
        # The scoring expression as imsrc._neighbours writes it (imsrc._expr): full precision up to 2,000
        # dimensions, the same numbers from the service and the SQL functions.
        expr = legacy_global_expr(dimension)
        # The query read once, as full precision first (query_as): a half-precision query in the re-sort put
        # scores off by up to ~1e-5 and near-ties in another order than exact (issue 19's SQL comparison).
        q = query_as("vector" if "vector(" in expr else "halfvec", dimension)
        half = query_as("halfvec", dimension)
        orders = [
            f"{category_index_expr(dimension)} <#> {half}" if indexed else f"({expr} <=> {q}) + 0"
            for _, indexed in categories
        ]
        branches = []
        partitions = self.partitions()
        for (category_id, indexed), order in zip(categories, orders, strict=True):
            if indexed and partitions and not full_scores:
                # The walk on the category's partition, scored from the partition's own half-precision row (its
                # page is read anyway). A JOIN to embeddings for the full-precision vector read one more page per
                # row found, mostly from outside PostgreSQL's cache at 1M rows: 6.7 -> 4.4 ms for one category,
                # 11.1 -> 8.7 for three (fresh queries on the 1M real-calibrated catalog), for scores that move
                # by ~1e-5.
                branches.append(
                    f"(SELECT image_id, {_half_score(dimension)} AS score "
                    f"FROM category_vectors WHERE model_id = {int(model_id)} AND category_id = {int(category_id)} "
                    f"ORDER BY {order} LIMIT {int(limit)})"
                )
                continue
            if indexed and partitions:  # full_scores: the partition's walk, its rows' vectors from embeddings
                rows = (
                    f"(SELECT image_id FROM category_vectors WHERE model_id = {int(model_id)} AND category_id = "
                    f"{int(category_id)} ORDER BY {order} LIMIT {int(limit)}) v JOIN embeddings USING (image_id) "
                    f"WHERE embeddings.model_id = {int(model_id)}"
                )
            else:
                rows = (
                    f"embeddings WHERE model_id = {int(model_id)} AND category_id = {int(category_id)} "
                    f"ORDER BY {order} LIMIT {int(limit)}"
                )
            branches.append(
                f"(SELECT image_id, 1 - (e <=> {q}) AS score FROM (SELECT image_id, {expr} AS e FROM {rows}) x)"
            )
        sql = (
            f"SELECT image_id, score FROM ({' UNION ALL '.join(branches)}) s "
            f"ORDER BY score DESC, image_id LIMIT {int(limit)}"
        )
        return sql, expr, q, orders

    def sample_members(self, model_id: int, category_id: int | None, n: int) -> list[tuple[int, str]]:
        """Up to n of the category's members (None: of the model's vectors; image id, vector as text), the same
        ones every time (ordered by a hash of the id): a calibration repeated on unchanged rows measures the same
        thing."""
        where = "" if category_id is None else f" AND category_id = {int(category_id)}"
        rows = self.session.execute(
            text(
                f"SELECT image_id, embedding::text FROM embeddings WHERE model_id = :m{where}"
                " ORDER BY hashint8(image_id), image_id LIMIT :n"
            ),
            {"m": int(model_id), "n": int(n)},
        ).all()
        return [(int(r[0]), str(r[1])) for r in rows]

    def count_up_to(self, model_id: int, limit: int) -> int:
        """The model's vectors, counted only up to `limit` (bounded cost whatever the catalog's size)."""
        if distributed(self.session):
            # Categorised vectors as the prototypes count them: no shard is asked, so a worker being down does
            # not fail every search here.
            return min(limit, sum(self.member_counts(model_id).values()))
        return int(
            self.session.execute(
                text(
                    f"SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE model_id = {int(model_id)} "
                    f"LIMIT {int(limit)}) s"
                )
            ).scalar_one()
        )

    def count_in(self, model_id: int, category_ids: Sequence[int]) -> int:
        return int(
            self.session.execute(
                text(
                    f"SELECT count(*) FROM embeddings WHERE model_id = {int(model_id)} AND category_id IN "
                    f"({','.join(str(int(c)) for c in category_ids) or 'NULL'})"
                )
            ).scalar_one()
        )

    def _global_ann_sql(
        self, model_id: int, dimension: int, limit: int, ef_search: int, half: bool = True
    ) -> tuple[str, dict[str, str]]:
        """The walk of the model's graph over every image: ordered by the graph's own expression (`half`: on
        halfvec, embedding_expr; else a legacy graph, legacy_global_expr), scored from the row's full-precision
        vector. The query as query_as gives it."""
        expr = embedding_expr(dimension) if half else legacy_global_expr(dimension)
        kind = "halfvec" if "halfvec" in expr else "vector"
        sql = (
            f"SELECT image_id, 1 - (embedding <=> {query_as('vector')}) AS score FROM embeddings "
            f"WHERE model_id = {int(model_id)} "
            f"ORDER BY {expr} <=> {query_as(kind, dimension)} LIMIT {int(limit)}"
        )
        return sql, walk_settings(ef_search, limit)

    def global_ann(
        self, model_id: int, dimension: int, query: str | QueryVector, limit: int, ef_search: int, *, half: bool = True
    ) -> list[Hit]:
        """The per-model cosine HNSW index over every image (mode `ann` without a category filter); `half`: the
        graph is on halfvec (ModelRepository.global_index_half)."""
        sql, settings = self._global_ann_sql(model_id, dimension, limit, ef_search, half)
        engine = self.session.get_bind()
        rows: Sequence[Any]
        if isinstance(engine, Engine) and distributed(self.session):
            rows = citus_read(engine, _psycopg(sql), {"q": query_text(query)}, settings)
        else:
            rows = read_with_settings(self.session, sql, {"q": query}, settings)
        return sorted(((int(r[0]), float(r[1])) for r in rows), key=lambda h: (-h[1], h[0]))

    def global_ann_hydrated(
        self, model_id: int, dimension: int, query: str | QueryVector, limit: int, ef_search: int, *, half: bool = True
    ) -> tuple[list[Hit], dict[int, HitInfo]]:
        """global_ann() and hydrate() of its hits in one statement (one round trip fewer per search): the same walk
        as a subquery (its LIMIT keeps it one, planned as before), the hits' rows joined to it. On Citus, the two
        reads."""
        if distributed(self.session):
            hits = self.global_ann(model_id, dimension, query, limit, ef_search, half=half)
            return hits, self.hydrate([h[0] for h in hits])
        walk, settings = self._global_ann_sql(model_id, dimension, limit, ef_search, half)
        sql = (
            f"SELECT n.image_id, n.score, {HYDRATE_COLUMNS} FROM ({walk}) n"
            f" LEFT JOIN {HYDRATE_FROM} ON i.id = n.image_id"
        )
        rows = read_with_settings(self.session, sql, {"q": query}, settings)
        hits = sorted(((int(r[0]), float(r[1])) for r in rows), key=lambda h: (-h[1], h[0]))
        return hits, {int(r[0]): _hit_info(r[2:]) for r in rows if r[2] is not None}

    def _exact_sql(self, model_id: int, limit: int, category_ids: Sequence[int] | None) -> str:
        where = f"model_id = {int(model_id)}"
        if category_ids is not None:
            where += f" AND category_id IN ({','.join(str(int(c)) for c in category_ids) or 'NULL'})"
        # Full precision vectors and `+ 0`, so no (approximate) index can take over the ordering. The distance is
        # computed once per row and the score (1 - distance, the same float8 arithmetic) in Python: a score column
        # beside a sort key made PostgreSQL compute both, two distances for every row scanned.
        return (
            f"SELECT image_id, (embedding <=> CAST(:q AS vector)) + 0 AS distance FROM embeddings WHERE {where} "
            f"ORDER BY distance, image_id LIMIT {int(limit)}"
        )

    def exact(
        self, model_id: int, query: str | QueryVector, limit: int, category_ids: Sequence[int] | None
    ) -> list[Hit]:
        """Brute force over the model's vectors (optionally within categories): the ground truth."""
        rows = self.session.execute(text(self._exact_sql(model_id, limit, category_ids)), {"q": query}).all()
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def exact_hydrated(
        self, model_id: int, query: str | QueryVector, limit: int, category_ids: Sequence[int] | None
    ) -> tuple[list[Hit], dict[int, HitInfo]]:
        """exact() and hydrate() of its hits in one statement (one round trip fewer per search): the same scan as
        a subquery (its LIMIT keeps it one), the hits' rows joined to it. On Citus, the two statements."""
        if distributed(self.session):  # through the coordinator: the text form (QueryVector)
            hits = self.exact(model_id, query_text(query), limit, category_ids)
            return hits, self.hydrate([h[0] for h in hits])
        sql = (
            f"SELECT n.image_id, n.distance, {HYDRATE_COLUMNS} FROM ({self._exact_sql(model_id, limit, category_ids)})"
            f" n LEFT JOIN {HYDRATE_FROM} ON i.id = n.image_id ORDER BY n.distance, n.image_id"
        )
        rows = self.session.execute(text(sql), {"q": query}).all()
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows], {
            int(r[0]): _hit_info(r[2:]) for r in rows if r[2] is not None
        }

    # ------------------------------------------------------------------ results
    def hydrate(self, image_ids: Sequence[int]) -> dict[int, HitInfo]:
        """The hits' rows. Read-only units of work only (searches): on Citus from the coordinator's own shards of
        images and categories (db.citus.local_relations: planned by PostgreSQL alone, not by Citus)."""
        if not image_ids:
            return {}
        local = local_relations(self.session)
        columns, source = hydrate_sql(local.get("images", "images"), local.get("categories", "categories"))
        rows = self.session.execute(
            text(f"SELECT {columns} FROM {source} WHERE i.id = ANY(:ids)"), {"ids": list(image_ids)}
        )
        return {int(r[0]): _hit_info(r) for r in rows}


def hydrate_sql(images: str = "images", categories: str = "categories") -> tuple[str, str]:
    """What a hit shows besides its score (HitInfo): the columns and the FROM, images i and categories c, each read
    from the relation named (the table, or on Citus its local shard)."""
    return (
        "i.id, i.category_id, c.name, i.canonical_id,"
        f" (SELECT count(*) FROM {images} d WHERE d.canonical_id = i.id) AS duplicates,"
        " i.original_name, i.width, i.height, i.byte_size, i.caption",
        f"({images} i LEFT JOIN {categories} c ON c.id = i.category_id)",
    )


HYDRATE_COLUMNS, HYDRATE_FROM = hydrate_sql()


def _hit_info(r: Sequence[Any]) -> HitInfo:
    """A HitInfo from the HYDRATE_COLUMNS of a row."""
    return HitInfo(
        int(r[0]),
        None if r[1] is None else int(r[1]),
        r[2],
        None if r[3] is None else int(r[3]),
        int(r[4]),
        r[5],
        r[6],
        r[7],
        r[8],
        r[9],
    )
