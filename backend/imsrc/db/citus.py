"""Which shape the catalog has: plain PostgreSQL, or distributed on a Citus cluster (migration 0010_citus).

A few statements differ between the shapes (db/README.md, "Citus"): on Citus, uncategorised vectors have
category_id 0 (a distribution column cannot be NULL), inserts into embeddings name the category themselves, and
per-statement planner settings are sent with SET LOCAL so that Citus passes them on to the workers. The answer
is looked up once per database (engine URL) and cached: a catalog does not change shape while it runs.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from imsrc.db.engine import CONNECT_ARGS, SIDE_POOL_SIZE, side_engine

UNCATEGORISED = 0  # embeddings.category_id of uncategorised images on Citus
_CACHE: dict[str, bool] = {}
_PARTITIONS: dict[str, bool] = {}
_CATEGORY_READ: dict[str, bool] = {}
_GUARD = threading.Lock()


def _cache_key(session: Session) -> str:
    bind: Any = session.get_bind()
    engine = getattr(bind, "engine", bind)
    return str(engine.url)


def _cached(cache: dict[str, bool], session: Session, look_up: Callable[[], bool]) -> bool:
    """look_up()'s answer for this session's database, asked once and then remembered (until forget())."""
    key = _cache_key(session)
    with _GUARD:
        if key in cache:
            return cache[key]
    found = look_up()
    with _GUARD:
        cache[key] = found
    return found


def distributed(session: Session) -> bool:
    """Whether `embeddings` is a Citus distributed table in this catalog."""

    def look_up() -> bool:
        found = bool(
            session.execute(
                text(
                    "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL AND EXISTS ("
                    " SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relname = 'embeddings' AND n.nspname = current_schema())"
                )
            ).scalar()
        )
        return found and bool(
            session.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'embeddings'::regclass"
                    " AND partmethod = 'h')"
                )
            ).scalar()
        )

    return _cached(_CACHE, session, look_up)


def category_partitions(session: Session) -> bool:
    """Whether per-category indexes live on category_vectors' partitions (plain PostgreSQL since migration 0013).
    Cached per database like `distributed`: asked on every two-stage search, it was one more round trip each."""
    return _cached(
        _PARTITIONS,
        session,
        lambda: (
            not distributed(session)
            and bool(session.execute(text("SELECT to_regclass('category_vectors') IS NOT NULL")).scalar())
        ),
    )


# A search's own statements on the coordinator read reference tables (categories, embedding_models,
# category_prototypes) and the Citus-local images: the model row, stage 1's prototype version, the image's row for
# `similar`, its near-duplicate candidates, the hits' rows. Named
# by their distributed (shell) names, each went through Citus' planner, which routes it to the one local placement,
# deparses the shard query to text and runs that through its local executor, planned again: ~0.2-0.4 ms more than
# the same statement on plain PostgreSQL (0.38 vs 0.15 ms for the prototype version, 0.42 vs 0.19 ms for a hydrate,
# prepared, load ~2; BENCHMARKS.md "Citus"). Every such table has one shard, and the coordinator holds an active
# placement of each (reference tables are copied to every node, the Citus-local ones live there): read that shard
# relation by name (e.g. images_102009), which PostgreSQL plans alone, and the rows are the same ones. Only for
# read-only units of work (searches; their callers say so): a write to these tables earlier in the same transaction
# is seen where Citus ran it through its local executor, but not where it used a connection to this node itself.
# Names cached per database like `distributed` (a table keeps its shard id; migrations call forget()); where any
# table lacks a local placement (a session on a worker, which holds no images) the tables' own names are used.
SEARCH_LOCAL_TABLES = ("images", "categories", "category_prototypes", "embedding_models")
_LOCAL: dict[str, dict[str, str]] = {}


def local_relations(session: Session) -> dict[str, str]:
    """SEARCH_LOCAL_TABLES -> the relation a read-only statement names for it: its local shard relation on a Citus
    node that holds a placement of every one of them, else {} (use the tables' own names)."""
    if not distributed(session):
        return {}
    key = _cache_key(session)
    with _GUARD:
        if key in _LOCAL:
            return _LOCAL[key]
    rows = session.execute(
        text(
            "SELECT c.relname, shard_name(s.logicalrelid, s.shardid) FROM pg_dist_shard s"
            " JOIN pg_class c ON c.oid = s.logicalrelid"
            " JOIN pg_dist_partition t ON t.logicalrelid = s.logicalrelid AND t.partmethod = 'n'"
            " JOIN pg_dist_placement p ON p.shardid = s.shardid AND p.shardstate = 1"
            " JOIN pg_dist_local_group l ON l.groupid = p.groupid"
            " WHERE s.logicalrelid = ANY(CAST(:t AS regclass[]))"
        ),
        {"t": list(SEARCH_LOCAL_TABLES)},
    ).all()
    found = {str(table): str(shard) for table, shard in rows}
    plain = all(re.fullmatch(r"[a-z_][a-z0-9_]*", shard) for shard in found.values())  # written into statements
    if set(found) != set(SEARCH_LOCAL_TABLES) or len(rows) != len(found) or not plain:
        found = {}
    with _GUARD:
        _LOCAL[key] = found
    return found


def forget(url: str | None = None) -> None:
    """Drop cached answers about a catalog's shape (after migrations: imsrc.db.engine.upgrade/downgrade)."""
    with _GUARD:
        for cache in (_CACHE, _PARTITIONS, _CATEGORY_READ, _PLACEMENTS, _LOCAL):
            if url is None:
                cache.clear()
            else:
                cache.pop(url, None)


def category_read_delegated(session: Session) -> bool:
    """Whether this distributed catalog has imsrc._category_read (CITUS_CATEGORY_READ), which every upgrade since it
    was added makes; a catalog last migrated by an older imsrc reads through pg_queries.citus_read instead."""
    return _cached(
        _CATEGORY_READ,
        session,
        lambda: bool(
            session.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_dist_object WHERE objid = to_regprocedure(:f)"
                    " AND distribution_argument_index IS NOT NULL)"
                ),
                {"f": CATEGORY_READ_SIGNATURE},
            ).scalar()
        ),
    )


# Stage 2's per-category reads go straight to the worker that holds the category's shard when the service can
# connect there (Citus lets a client query any node with metadata, which every worker has since Citus 11): the same
# call, imsrc._category_read, the same rows, without the coordinator's hop (receive the call, plan its delegation,
# send it on, wait, pass the rows back: ~1-1.5 ms of a ~2-4 ms read on the bench machine, interleaved A/B in
# BENCHMARKS.md "Citus"). Where the shard is is asked from the coordinator for the categories a search needs and
# kept PLACEMENT_TTL_S; a shard moved since (a rebalance) is read all the same, only slower: the function, on a
# node without the shard, sends the read on to the node that has it (Citus delegates it again). A worker the
# service cannot connect to (another network, other credentials, down) is read through the coordinator for
# UNREACHABLE_RETRY_S, which also gives a down worker its 503 naming the node, as before.
PLACEMENT_TTL_S = 10.0
UNREACHABLE_RETRY_S = 30.0


Node = tuple[str, int, int]  # a worker's host, port and Citus group id (pg_dist_node)


@dataclass
class _Placements:
    at: float  # time.monotonic() of the look-up
    nodes: dict[int, Node | None]  # category id -> its shard's worker; None: the coordinator


_PLACEMENTS: dict[str, _Placements] = {}  # keyed by the coordinator's URL, like the caches above
_UNREACHABLE: dict[str, float] = {}  # worker URL -> monotonic time until which it is read through the coordinator
_WORKER_POOLS: weakref.WeakKeyDictionary[Engine, dict[Node, Engine]] = weakref.WeakKeyDictionary()


def _look_up_placements(engine: Engine, categories: Iterable[int]) -> dict[int, Node | None]:
    """On the stage-2 side pool, which does not ping before a checkout: a dropped connection is retried once. A
    category whose shard has no active primary placement maps to None (the coordinator) like one on the coordinator,
    and is not asked again before the placements expire."""
    sql = text(
        "SELECT c, n.nodename, n.nodeport, n.groupid FROM unnest(CAST(:c AS bigint[])) c"
        " JOIN pg_dist_placement p ON p.shardid = get_shard_id_for_distribution_column('embeddings', c)"
        " JOIN pg_dist_node n ON n.groupid = p.groupid AND n.noderole = 'primary' AND n.isactive"
    )
    categories = sorted(set(categories))
    for attempt in (1, 2):
        try:
            with side_engine(engine).connect() as conn:
                rows = conn.execute(sql, {"c": categories}).all()
            break
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise
    found: dict[int, Node | None] = dict.fromkeys(categories)
    found.update(
        {int(c): None if int(group) == 0 else (str(host), int(port), int(group)) for c, host, port, group in rows}
    )
    return found


def category_workers(engine: Engine, categories: Iterable[int]) -> dict[int, Engine | None]:
    """A pool on the worker that holds each category's shard, or None where the read should go through the
    coordinator (the shard is on the coordinator, the worker was unreachable lately, or the placement is unknown)."""
    wanted = set(categories)
    key = str(engine.url)
    now = time.monotonic()
    with _GUARD:
        known = _PLACEMENTS.get(key)
        fresh = known is not None and now - known.at < PLACEMENT_TTL_S and wanted <= known.nodes.keys()
    if not fresh:
        nodes = _look_up_placements(engine, wanted | (set(known.nodes) if known else set()))
        with _GUARD:
            _PLACEMENTS[key] = known = _Placements(now, nodes)
    assert known is not None
    out: dict[int, Engine | None] = {}
    for category in wanted:
        node = known.nodes.get(category)
        out[category] = None if node is None else _worker_pool(engine, node)
    return out


def _worker_pool(engine: Engine, node: Node) -> Engine | None:
    with _GUARD:
        pools = _WORKER_POOLS.setdefault(engine, {})
        pool = pools.get(node)
        if pool is None:
            # The coordinator's URL (user, password, database, options) with the worker's host and port; like
            # side_engine: no ping before each checkout (the read runs again on a dropped connection).
            pool = create_engine(
                engine.url.set(host=node[0], port=node[1]),
                pool_pre_ping=False,
                pool_size=SIDE_POOL_SIZE,
                max_overflow=-1,
                connect_args={**CONNECT_ARGS, "connect_timeout": 2},
            )
            event.listen(pool, "connect", lambda dbapi, _record, group=node[2]: _check_group(dbapi, group))
            event.listen(engine, "engine_disposed", lambda _conn, pool=pool: pool.dispose())
            pools[node] = pool
        if _UNREACHABLE.get(str(pool.url), 0.0) > time.monotonic():
            return None
        return pool


def _check_group(dbapi_connection: Any, group: int) -> None:
    """A new connection to a worker must reach that worker: the host name Citus knows it by may name another
    server from where the service runs (`localhost`). Anything else counts as not connecting (read through the
    coordinator)."""
    try:
        with dbapi_connection.cursor() as cur:
            cur.execute("SELECT groupid FROM pg_dist_local_group")
            found = cur.fetchone()
        dbapi_connection.rollback()
    except psycopg.Error as exc:  # not a Citus node at all
        found = (f"{type(exc).__name__}: {str(exc).splitlines()[0]}",)
    if found is None or found[0] != group:
        dbapi_connection.close()
        raise psycopg.OperationalError(f"not Citus node group {group}: {found}")


def worker_unreachable(pool: Engine) -> None:
    """The service could not connect to this worker: read through the coordinator for a while."""
    with _GUARD:
        _UNREACHABLE[str(pool.url)] = time.monotonic() + UNREACHABLE_RETRY_S


def uncategorised_condition(session: Session, alias: str = "") -> str:
    column = f"{alias}.category_id" if alias else "category_id"
    return f"{column} = {UNCATEGORISED}" if distributed(session) else f"{column} IS NULL"


def categorised_condition(session: Session, alias: str = "") -> str:
    column = f"{alias}.category_id" if alias else "category_id"
    return f"{column} <> {UNCATEGORISED}" if distributed(session) else f"{column} IS NOT NULL"


# Citus cannot plan a parameterised LANGUAGE sql function that reads a table in its metadata (distributed, reference
# or Citus-local: "Consider using PL/pgSQL functions instead"): every non-immutable SQL function of the imsrc schema
# (migrations 0005-0009: stage 1's ranking, the keyword look-ups) becomes the same query in PL/pgSQL, with the same
# signature, result and volatility. Immutable ones read no table and stay.
CITUS_SQL_FUNCTIONS_TO_PLPGSQL = r"""
DO $$
DECLARE
    f record;
    body text;
BEGIN
    FOR f IN
        SELECT p.oid, p.proname, p.proretset, p.provolatile, p.prosrc
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = 'imsrc' AND l.lanname = 'sql' AND p.provolatile <> 'i'
    LOOP
        body := regexp_replace(f.prosrc, ';?\s*$', '');
        body := E'#variable_conflict use_column\nBEGIN\n'
                || CASE WHEN f.proretset THEN 'RETURN QUERY ' || body || E';\n' ELSE 'RETURN (' || body || E');\n' END
                || 'END';
        EXECUTE format('CREATE OR REPLACE FUNCTION imsrc.%I(%s) RETURNS %s LANGUAGE plpgsql %s AS %L',
                       f.proname, pg_get_function_arguments(f.oid), pg_get_function_result(f.oid),
                       CASE f.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END, body);
    END LOOP;
END $$
"""


# The SQL functions' stage-2 walk (imsrc._walk, migration 0005) sets its planner and pgvector settings with
# set_config() and SET clauses: on Citus those stay on the coordinator, and the workers, which plan and run each
# shard's query, walked at their defaults (ef_search 40, and a sequential scan + sort where the planner liked it
# better than the partial index). Citus passes a SET LOCAL on to the workers' transactions only when (1)
# citus.propagate_set_commands is 'local', (2) it sees the SET below a nested executor (a function called by a
# statement: imsrc._set_local via PERFORM; a SET run directly in the PL/pgSQL body is not seen as one), and (3)
# the remote transaction is a coordinated one, which a read-only statement outside BEGIN ... COMMIT is not:
# create_intermediate_result (a one-row result kept on the coordinator until the end of the transaction) makes
# it one. imsrc._settings_for_workers does those steps for the walk and for imsrc._category_read's fallback
# (CITUS_CATEGORY_READ) and returns the caller's values, which they put back afterwards, on the workers too. SET is
# not allowed in a non-volatile function, hence VOLATILE (same results; it only takes a new snapshot per statement,
# which a read does not mind).
CITUS_WALK = r"""
CREATE OR REPLACE FUNCTION imsrc._set_local(p_name text, p_value text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_name !~ '^[a-z_.]+$' THEN
        RAISE EXCEPTION 'imsrc: unexpected setting name %', p_name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_value IS NULL THEN
        EXECUTE format('SET LOCAL %s TO DEFAULT', p_name);
    ELSE
        EXECUTE format('SET LOCAL %s = %L', p_name, p_value);
    END IF;
END $$;

-- SET LOCAL p_names = p_values where Citus passes them on to the workers (called by a statement, in a transaction
-- made a coordinated one); returns the values they had, for imsrc._set_local to put back.
CREATE OR REPLACE FUNCTION imsrc._settings_for_workers(p_names text[], p_values text[]) RETURNS text[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    before text[];
BEGIN
    SELECT array_agg(current_setting(n, true) ORDER BY o) INTO before FROM unnest(p_names) WITH ORDINALITY u(n, o);
    PERFORM create_intermediate_result('imsrc_settings', 'SELECT 1');
    PERFORM imsrc._set_local(n, v) FROM unnest(p_names, p_values) u(n, v);
    RETURN before;
END $$;

CREATE OR REPLACE FUNCTION imsrc._walk(p_sql text, p_query vector, p_ef int, p_limit int)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE plpgsql VOLATILE
SET citus.propagate_set_commands = 'local' AS $$
DECLARE
    names text[] := ARRAY['enable_sort', 'enable_seqscan', 'hnsw.iterative_scan', 'hnsw.ef_search'];
    before text[];
BEGIN
    SELECT imsrc._settings_for_workers(
               names, ARRAY['off', 'off', 'relaxed_order', least(1000, greatest(p_ef, p_limit))::text])
      INTO before;
    RETURN QUERY EXECUTE p_sql USING p_query;
    PERFORM imsrc._set_local(n, v) FROM unnest(names, before) u(n, v);
END $$;
"""


# The service's stage 2 on Citus reads one category at a time (search/pg_queries.citus_category_read) through this
# function, distributed by its category argument and co-located with embeddings: Citus then delegates the whole call
# `SELECT * FROM imsrc._category_read(<category>, ...)`, made outside a transaction block, to the worker that holds
# the category's shard, in one round trip, and the worker reads its own shard table, planned there with the settings
# set_config() just made. `p_sql` names the table as `FROM embeddings`; on the shard's node that becomes
# `FROM <shard table> embeddings` (same columns, same partial indexes, same plan and rows): read through the
# distributed table, Citus planned the query again on the worker, deparsed it with the query vector spelled out twice
# (1280-d: tens of kB of text) and ran the shard's query through its local executor, which parsed and planned that
# text once more (~0.1-0.7 ms per read, interleaved A/B in BENCHMARKS.md "Citus"). A shard that moves away between
# the placement check and the read leaves its old table behind until Citus' deferred cleanup drops it, as it does
# for a read that Citus itself planned a moment before the move.
# Sending SET LOCALs instead needed a remote transaction block: BEGIN and the SETs, the query, ROLLBACK, three round
# trips to the worker for one query. Where Citus does not delegate the call (inside BEGIN ... COMMIT, a worker
# without metadata, or the shard moved away a moment ago) the shard is not on the node running the function, and
# the settings travel as the SQL functions' walk sends them (CITUS_WALK: SET LOCAL below a nested call, in a
# coordinated transaction), then are put back: the same rows either way. `p_sql` reads the query vector as $1 (text).
CITUS_CATEGORY_READ = r"""
CREATE OR REPLACE FUNCTION imsrc._category_read(p_category bigint, p_sql text, p_query text, p_names text[],
                                                p_values text[])
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE plpgsql VOLATILE
SET citus.propagate_set_commands = 'local' AS $$
DECLARE
    shard bigint := get_shard_id_for_distribution_column('embeddings', p_category);
    before text[];
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(p_names) n WHERE n !~ '^[a-z_.]+$') THEN
        RAISE EXCEPTION 'imsrc: unexpected setting name in %', p_names USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_dist_placement p JOIN pg_dist_local_group l ON l.groupid = p.groupid
                WHERE p.shardid = shard) THEN
        PERFORM set_config(n, v, true) FROM unnest(p_names, p_values) u(n, v);
        RETURN QUERY EXECUTE regexp_replace(p_sql, '\mFROM embeddings\M',
                                            'FROM ' || shard_name('embeddings'::regclass, shard) || ' embeddings', 'g')
                     USING p_query;
        RETURN;
    END IF;
    SELECT imsrc._settings_for_workers(p_names, p_values) INTO before;
    RETURN QUERY EXECUTE p_sql USING p_query;
    PERFORM imsrc._set_local(n, v) FROM unnest(p_names, before) u(n, v);
END $$;

SELECT create_distributed_function('imsrc._set_local(text,text)');
SELECT create_distributed_function('imsrc._settings_for_workers(text[],text[])');
SELECT create_distributed_function('imsrc._category_read(bigint,text,text,text[],text[])', 'p_category',
                                   colocate_with := 'embeddings');
"""
CATEGORY_READ_SIGNATURE = "imsrc._category_read(bigint,text,text,text[],text[])"

# imsrc.similar's first step looked the image's vector up by (model_id, image_id): not the distribution column,
# so every shard was asked (32 tasks for one row). The image's category names its shard; read in the same
# snapshot (the function is STABLE), so a concurrent move cannot hide the row.
CITUS_IMAGE_VECTOR = r"""
CREATE OR REPLACE FUNCTION imsrc._image_vector(p_image_id bigint, p_model_id int, p_model text) RETURNS vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v vector;
    c bigint;
BEGIN
    SELECT coalesce(i.category_id, 0) INTO c FROM images i WHERE i.id = p_image_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'imsrc: image % does not exist', coalesce(p_image_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT e.embedding INTO v FROM embeddings e
     WHERE e.model_id = p_model_id AND e.category_id = c AND e.image_id = p_image_id;
    IF v IS NULL THEN
        RAISE EXCEPTION 'imsrc: image % has no embedding for model % yet', p_image_id, p_model
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;
"""

# imsrc._search's small-catalog rule counted the model's vectors up to two_stage_min_rows (20,000) with
# `SELECT count(*) FROM (SELECT 1 FROM embeddings ... LIMIT min_rows)`: on Citus every shard returns up to that
# many rows to the coordinator, per search. The service counts categorised vectors from the mean prototypes'
# member_count there (a reference table, no shard asked: NeighbourRepository.count_up_to); the SQL functions now
# do the same. Rewritten in whichever imsrc function holds that statement, so a later revision of _search
# keeps it; if the text changes, the function keeps its own count (slower on Citus, still right).
CITUS_COUNT_FROM_PROTOTYPES = r"""
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'imsrc' AND p.prosrc ~ 'SELECT 1 FROM embeddings WHERE model_id = p_model_id LIMIT min_rows'
    LOOP
        EXECUTE regexp_replace(pg_get_functiondef(f.oid),
            '\(SELECT count\(\*\) FROM \(\s*SELECT 1 FROM embeddings WHERE model_id = p_model_id LIMIT min_rows\) s\)',
            '(SELECT least(min_rows, coalesce(sum(x.member_count), 0)) FROM category_prototypes x'
            ' WHERE x.model_id = p_model_id AND x.kind = ''mean'' AND x.ordinal = 0)', 'g');
    END LOOP;
END $$
"""


# imsrc._duplicates_first (migration 0004) joins the query image's pHash near-duplicates with `embeddings` by image
# id: on Citus every shard is asked, and the call fails while any worker is down even when no near-duplicate lives
# there (the service asks only their categories' shards: DuplicateSearchRepository._near_citus). On Citus the
# candidates' categories are read first and the join names them as constants, so Citus prunes to those shards.
# Applied only while the function still has 0004's join (not after the function itself has changed); same result.
CITUS_DUPLICATES_FIRST = r"""
DO $do$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'imsrc' AND p.proname = '_duplicates_first'
           AND position('JOIN embeddings e ON e.image_id = t.target AND e.model_id = %s''' IN p.prosrc) > 0
    ) THEN
        RETURN;
    END IF;
    CREATE OR REPLACE FUNCTION imsrc._duplicates_first(p_model_id int, p_query vector, p_image bigint, p_k int,
                                                       p_categories bigint[], p_include_duplicates boolean,
                                                       p_ids bigint[], p_scores double precision[])
    RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
    LANGUAGE plpgsql STABLE AS $f$
    DECLARE
        ph bit(64);
        threshold int := imsrc._setting('duplicate_threshold', 4)::int;
        cond text := 'phash IS NOT NULL AND bit_count(phash # $1) <= $2';
        target text := CASE WHEN p_include_duplicates THEN 'id' ELSE 'coalesce(canonical_id, id)' END;
        near_ids bigint[];
        near_scores double precision[];
        shards bigint[];
    BEGIN
        SELECT i.phash INTO ph FROM images i WHERE i.id = p_image;
        IF ph IS NOT NULL THEN
            IF threshold / 4 <= 2 THEN  -- duplicates.MAX_BAND_RADIUS: beyond it a scan is cheaper than the probes
                SELECT cond || ' AND (' || string_agg(format(
                           '(((phash::bigint >> %s) & 65535)::int) = ANY(%L::int[])', 48 - 16 * b,
                           imsrc._band_values(((ph::bigint >> (48 - 16 * b)) & 65535)::int, threshold / 4)),
                           ' OR ') || ')'
                  INTO cond FROM generate_series(0, 3) b;
            END IF;
            -- The candidates' categories (on the coordinator), within the caller's categories if any.
            EXECUTE format(
                'SELECT array_agg(DISTINCT coalesce(i.category_id, 0)) FROM'
                ' (SELECT %s AS target FROM images WHERE %s GROUP BY 1) t JOIN images i ON i.id = t.target'
                ' WHERE t.target <> $3 AND ($4::bigint[] IS NULL OR i.category_id = ANY($4))', target, cond)
                INTO shards USING ph, threshold, coalesce(p_image, 0), p_categories;
            IF shards IS NOT NULL THEN
                EXECUTE format(
                    'SELECT array_agg(x.target ORDER BY x.o), array_agg(x.score ORDER BY x.o) FROM ('
                    ' SELECT t.target, 1 - (e.embedding <=> $3) AS score,'
                    '        row_number() OVER (ORDER BY t.d, 1 - (e.embedding <=> $3) DESC, t.target) AS o'
                    '   FROM (SELECT %s AS target, min(bit_count(phash # $1)) AS d FROM images WHERE %s GROUP BY 1) t'
                    '   JOIN embeddings e ON e.image_id = t.target AND e.model_id = %s'
                    '    AND e.category_id = ANY(%L::bigint[])'
                    '  WHERE t.target <> $4) x WHERE x.o <= %s',
                    target, cond, p_model_id, shards, p_k)
                    INTO near_ids, near_scores USING ph, threshold, p_query, coalesce(p_image, 0);
            END IF;
        END IF;
        RETURN QUERY
            WITH dups AS (
                SELECT u.id, u.s, u.o FROM unnest(near_ids, near_scores) WITH ORDINALITY u(id, s, o)
            ), rest AS (
                SELECT u.id, u.s, 1000000 + u.o AS o FROM unnest(p_ids, p_scores) WITH ORDINALITY u(id, s, o)
                 WHERE NOT EXISTS (SELECT 1 FROM dups f WHERE f.id = u.id)
            ), a AS (
                SELECT * FROM dups UNION ALL SELECT * FROM rest
            )
            SELECT a.id, a.s, c.name, (row_number() OVER (ORDER BY a.o))::int
              FROM a JOIN images i ON i.id = a.id LEFT JOIN categories c ON c.id = i.category_id
             ORDER BY a.o
             LIMIT p_k;
    END
    $f$;
END $do$
"""


def after_migrations(connection: Any) -> None:
    """Run by migrations/env.py after every upgrade: on a distributed catalog, rewrite the SQL functions that the
    revisions just applied may have (re)created in LANGUAGE sql (see CITUS_SQL_FUNCTIONS_TO_PLPGSQL), the
    stage-2 walk whose settings must reach the workers (CITUS_WALK), the service's one-category read delegated to
    the category's worker (CITUS_CATEGORY_READ), and three look-ups that asked every shard
    (CITUS_IMAGE_VECTOR, CITUS_COUNT_FROM_PROTOTYPES, CITUS_DUPLICATES_FIRST)."""
    distributed_now = connection.execute(
        text("SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL AND to_regclass('embeddings') IS NOT NULL")
    ).scalar()
    if (
        distributed_now
        and connection.execute(
            text("SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'embeddings'::regclass)")
        ).scalar()
    ):
        connection.execute(text(CITUS_SQL_FUNCTIONS_TO_PLPGSQL))
        connection.execute(text(CITUS_WALK))
        connection.execute(text(CITUS_CATEGORY_READ))
        connection.execute(text(CITUS_IMAGE_VECTOR))
        connection.execute(text(CITUS_COUNT_FROM_PROTOTYPES))
        connection.execute(text(CITUS_DUPLICATES_FIRST))


@dataclass(frozen=True)
class NodeStatus:
    node: str  # host:port
    role: str  # coordinator | worker
    active: bool
    reachable: bool
    shards: int


def node_statuses(session: Session) -> list[NodeStatus]:
    """Every node of the cluster with its shard count of embeddings, and whether it answers right now."""
    rows = session.execute(
        text(
            "SELECT n.nodename, n.nodeport, n.groupid, n.isactive,"
            " (SELECT count(*) FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid"
            "   WHERE s.logicalrelid = 'embeddings'::regclass AND p.groupid = n.groupid) AS shards"
            " FROM pg_dist_node n WHERE n.noderole = 'primary' ORDER BY n.groupid, n.nodeid"
        )
    ).all()
    # run_command_on_workers reports each worker's success instead of failing the whole statement.
    health = {
        (str(r[0]), int(r[1])): bool(r[2])
        for r in session.execute(text("SELECT nodename, nodeport, success FROM run_command_on_workers('SELECT 1')"))
    }
    out = []
    for host, port, group, active, shards in rows:
        out.append(
            NodeStatus(
                node=f"{host}:{port}",
                role="coordinator" if int(group) == 0 else "worker",
                active=bool(active),
                reachable=health.get((str(host), int(port)), int(group) == 0),
                shards=int(shards),
            )
        )
    return out


_REMOTE_NODE = re.compile(r"connection to the remote node (?:[^@\s]+@)?(\S+?):(\d+) failed")


def unreachable_node(message: str) -> str | None:
    """host:port of the worker a Citus error says it could not reach, or None."""
    found = _REMOTE_NODE.search(message)
    return f"{found.group(1)}:{found.group(2)}" if found else None


def sequential_shard_commands(session: Session) -> None:
    """On Citus, run this transaction's multi-shard DDL and writes over one connection per worker. Citus refuses
    parallel DDL on the embeddings (CREATE/DROP INDEX) after the same transaction read a reference table that
    they have a foreign key to, which every sync does (models, prototypes); sequential mode is allowed."""
    if distributed(session):
        session.execute(text("SET LOCAL citus.multi_shard_modify_mode = 'sequential'"))
