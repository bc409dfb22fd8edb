"""imsrc on a Citus cluster (issue 15): a local coordinator + two workers (tests/fixtures/citus.py), the catalog
migrated and indexed through the real CLI, compared with the same folder indexed on one plain server.

One catalog per module, built once: migrate, index (categories from folders, a re-encoded copy as a near-duplicate),
then the tests read it; the tests that stop a worker or add one run last and put the cluster back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db import citus
from imsrc.db.citus import category_workers
from imsrc.db.embedded import _free_port
from imsrc.db.engine import side_engine
from imsrc.db.session import Database
from imsrc.errors import NotFoundError
from imsrc.ingest.repository import IngestRepository
from imsrc.search.errors import BackendUnavailableError
from imsrc.search.pg_queries import CATEGORY_READ, citus_category_read, citus_read, walk_settings
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime
from imsrc.search.walks import LADDER
from tests.fixtures.citus import CitusCluster
from tests.fixtures.database import TEST_MODEL, CreateDatabase, database_for, scratch_dir
from tests.helpers import ROOT, make_image, run_cli
from tests.ingest_support import cli_env, index_command, psycopg_url, reencode, snapshot, write

pytestmark = pytest.mark.citus

CATEGORIES = {"boats": range(0, 9), "cats": range(100, 109), "trees": range(200, 209), "roads": range(300, 306)}
EXACT_MAX_ROWS = 5  # categories of 5+ vectors get their own HNSW index (IMSRC_SEARCH_EXACT_MAX_ROWS)


def _env(url: str, data: Path) -> dict[str, str]:
    return {
        "IMSRC_DATABASE_URL": url,
        "IMSRC_DATA_DIR": str(data),
        "IMSRC_MODEL": TEST_MODEL,
        "IMSRC_SEARCH_EXACT_MAX_ROWS": str(EXACT_MAX_ROWS),
        "IMSRC_WORKERS": "1",
    }


def _settings(url: str, data: Path) -> Settings:
    return Settings(
        database_url=url,
        data_dir=data,
        model=TEST_MODEL,
        search_two_stage_min_rows=0,
        search_exact_max_rows=EXACT_MAX_ROWS,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]


def _cli(url: str, data: Path, *args: str) -> Any:
    done = run_cli(*args, env=_env(url, data), timeout=600)
    assert done.returncode == 0, f"imsrc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


@dataclass
class Catalogs:
    citus_url: str
    plain_url: str
    data: Path
    folder: Path
    index_report: dict[str, Any]
    plain_snapshot: dict[str, Any]  # the one-node catalog as indexed, before any test changed it


@pytest.fixture(scope="module")
def catalogs(citus_cluster: CitusCluster, create_database: CreateDatabase) -> Iterator[Catalogs]:
    data = scratch_dir("citus-data")
    folder = data / "photos"
    for name, seeds in CATEGORIES.items():
        for seed in seeds:
            write(folder / name / f"{name}-{seed}.png", make_image(seed))
    # A near-duplicate: the first boat re-encoded as JPEG (same picture, other bytes).
    write(folder / "boats" / "boats-copy.jpg", reencode(make_image(0), "JPEG", quality=90))
    citus_url, plain_url = citus_cluster.create_database(), create_database("imsrc_single")

    def migrate_and_index(url: str) -> tuple[str, dict[str, Any]]:
        migrated = _cli(url, data, "migrate")
        indexed = _cli(url, data, "index", str(folder), "--category-from-folder", "--json")
        return migrated.stdout + migrated.stderr, json.loads(indexed.stdout)

    # Both catalogs at once: each command is mostly one process's start-up and the other core is idle.
    with ThreadPoolExecutor(max_workers=2) as pool:
        (migrated, report), _ = pool.map(migrate_and_index, [citus_url, plain_url])
    assert "schema at revision" in migrated  # the head, whatever comes after 0010_citus
    plain = database_for(_settings(plain_url, data), migrate=False)
    try:
        plain_snapshot = snapshot(plain)
    finally:
        plain.dispose()
    yield Catalogs(citus_url, plain_url, data, folder, report, plain_snapshot)
    shutil.rmtree(data, ignore_errors=True)


def _query(url: str, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(psycopg_url(url)) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def test_migrate_distributes_the_catalog(catalogs: Catalogs) -> None:
    shapes = dict(_query(catalogs.citus_url, "SELECT logicalrelid::text, partmethod::text FROM pg_dist_partition"))
    assert shapes["embeddings"] == "h"
    for reference in ("categories", "embedding_models", "category_prototypes"):
        assert shapes[reference] == "n", reference
    for local in ("images", "thumbnails", "image_blobs", "image_sources"):
        assert shapes.get(local) == "n", local  # Citus-local: in the metadata, kept on the coordinator
    column = _query(
        catalogs.citus_url,
        "SELECT column_to_column_name(logicalrelid, partkey) FROM pg_dist_partition"
        " WHERE logicalrelid = 'embeddings'::regclass",
    )
    assert column == [("category_id",)]
    reference_placements = _query(
        catalogs.citus_url,
        "SELECT count(DISTINCT groupid) FROM pg_dist_placement p "
        "JOIN pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'categories'::regclass",
    )
    assert reference_placements[0][0] >= 3  # the coordinator and both workers hold a copy
    # Migrating again is a no-op; a plain server got none of it.
    _cli(catalogs.citus_url, catalogs.data, "migrate")
    assert _query(catalogs.plain_url, "SELECT to_regclass('pg_dist_partition')") == [(None,)]
    stats = json.loads(_cli(catalogs.citus_url, catalogs.data, "stats", "--json").stdout)
    assert stats["counts"]["images"] == stats["counts"]["embeddings"] == sum(len(s) for s in CATEGORIES.values()) + 1


def test_index_on_citus_matches_one_node(catalogs: Catalogs) -> None:
    """Same folder, same catalog: images, categories, thumbnails, duplicates and the vectors on the shards."""
    expected = sum(len(s) for s in CATEGORIES.values()) + 1
    counts = catalogs.index_report["counts"]
    assert catalogs.index_report["status"] == "completed" and counts["new"] + counts["duplicate"] == expected
    sql = (
        "SELECT i.id, c.name, i.canonical_id, (t.image_id IS NOT NULL), e.category_id, e.embedding::text"
        " FROM images i JOIN categories c ON c.id = i.category_id LEFT JOIN thumbnails t ON t.image_id = i.id"
        " LEFT JOIN catalog_embeddings e ON e.image_id = i.id ORDER BY i.id"
    )
    citus, plain = _query(catalogs.citus_url, sql), _query(catalogs.plain_url, sql)
    assert len(citus) == expected and citus == plain
    assert all(row[3] for row in citus)  # every image has its thumbnail
    assert all(row[4] is not None for row in citus)  # ... and its vector, on its category's shard
    dups = json.loads(_cli(catalogs.citus_url, catalogs.data, "duplicates", "--json").stdout)
    assert json.dumps(dups, sort_keys=True) == json.dumps(
        json.loads(_cli(catalogs.plain_url, catalogs.data, "duplicates", "--json").stdout), sort_keys=True
    )
    copy_id, original_id = _query(
        catalogs.citus_url,
        "SELECT c.id, o.id FROM images c, images o WHERE"
        " c.original_name = 'boats-copy.jpg' AND o.original_name = 'boats-0.png'",
    )[0]
    assert [(g["canonical_id"], g["duplicate_ids"]) for g in dups["groups"]] == [(original_id, [copy_id])]
    # Each category's vectors live in one shard: the shard holding it has them all.
    per_shard = _query(
        catalogs.citus_url,
        "SELECT get_shard_id_for_distribution_column('embeddings', category_id), count(*) FROM embeddings GROUP BY 1",
    )
    assert sum(n for _, n in per_shard) == expected
    # The model's own graph (mode ann, every shard) got its calibrated width there too (search/walks.py).
    widths = "SELECT value->'ef', value->'rows', value->'samples' FROM search_state WHERE key LIKE 'walks:m%:ann'"
    (ef, rows, samples), plain_width = _query(catalogs.citus_url, widths)[0], _query(catalogs.plain_url, widths)[0]
    assert ef in LADDER and rows == plain_width[1] > 0 and samples == plain_width[2] > 1


def _search(url: str, data: Path, image_id: int, options: SearchOptions) -> list[tuple[int, float]]:
    db = database_for(_settings(url, data), migrate=False)
    try:
        runtime = SearchRuntime.create(db.settings)
        with db.session() as session:
            found = runtime.service(session).similar(image_id, options)
        return [(h.id, h.score) for h in found.results]
    finally:
        db.dispose()


SEARCHES = [
    SearchOptions(k=5, categories=1),  # one category: a router query to its shard
    SearchOptions(k=8, categories=3),
    SearchOptions(k=6, category=["cats", "roads"]),  # explicit filter, two shards
    SearchOptions(k=10, mode="ann"),  # every shard, merged on the coordinator
    SearchOptions(k=10, mode="exact"),
    SearchOptions(k=4, mode="exact", category=["trees"]),
]


@pytest.mark.parametrize("options", SEARCHES, ids=lambda o: f"{o.mode}-{o.categories}-{'+'.join(o.category)}")
def test_search_equals_one_node(catalogs: Catalogs, options: SearchOptions) -> None:
    for image_id in (1, 12, 21, 30):
        citus = _search(catalogs.citus_url, catalogs.data, image_id, options)
        plain = _search(catalogs.plain_url, catalogs.data, image_id, options)
        assert [i for i, _ in citus] == [i for i, _ in plain], (image_id, options)
        assert [s for _, s in citus] == pytest.approx([s for _, s in plain], abs=1e-6)
        assert len(citus) == options.k


def test_stage2_connections_do_not_wait_on_the_sessions_pool(catalogs: Catalogs) -> None:
    """On Citus each stage-2 statement runs on a connection beside the search's own. Searches holding every
    connection of their pool must not wait for those (they would, until the pool timeout, if both came from
    one pool): here a pool of one connection, held by the search's session."""
    settings = _settings(catalogs.citus_url, catalogs.data)
    url = catalogs.citus_url.replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=3)  # database_for cannot cap overflow
    db = Database(url=catalogs.citus_url, engine=engine, settings=settings, revision="head")
    try:
        with db.session() as session:
            found = SearchRuntime.create(settings).service(session).similar(12, SearchOptions(k=5, categories=2))
        assert len(found.results) == 5
    finally:
        db.dispose()


def test_category_indexes_are_per_shard_and_one_category_is_a_router_query(catalogs: Catalogs) -> None:
    names = [
        r[0]
        for r in _query(
            catalogs.citus_url,
            "SELECT indexname FROM pg_indexes WHERE tablename = "
            "'embeddings' AND indexname LIKE 'ix_embeddings_hv_%' ORDER BY 1",
        )
    ]
    assert len(names) == len(CATEGORIES)  # every category has 6+ rows: each got its partial HNSW index
    category_id, dimension = _query(
        catalogs.citus_url, "SELECT c.id, m.dimension FROM categories c, embedding_models m WHERE c.name = 'cats'"
    )[0]
    with psycopg.connect(psycopg_url(catalogs.citus_url)) as conn:
        conn.execute("SET LOCAL citus.propagate_set_commands = 'local'")
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                f"EXPLAIN SELECT image_id FROM embeddings WHERE model_id = 1 AND category_id = {category_id}"
                f" ORDER BY (embedding::halfvec({dimension})) <#> (SELECT embedding FROM embeddings LIMIT 1)::halfvec"
                f"({dimension}) LIMIT 5"
            ).fetchall()
        )
    assert "Task Count: 1" in plan and f"ix_embeddings_hv_m1_c{category_id}" in plan, plan


def test_sql_functions_on_citus(catalogs: Catalogs) -> None:
    sql = "SELECT image_id, score FROM imsrc.similar(%s, 6)"
    for image_id in (2, 15):
        citus, plain = _query(catalogs.citus_url, sql, (image_id,)), _query(catalogs.plain_url, sql, (image_id,))
        assert [r[0] for r in citus] == [r[0] for r in plain]
        # One node scores a walked category from its partition's half-precision copy (~5e-5 at most from the full
        # precision score; migration 0018), the Citus functions from embeddings.
        assert [r[1] for r in citus] == pytest.approx([r[1] for r in plain], abs=1e-4)


# Run on the shard: the walk's settings as the worker sees them, e.g. 321.111 (ef_search 321, then 1 for each of
# enable_seqscan off, enable_sort off, hnsw.iterative_scan relaxed_order).
WORKER_SETTINGS = (
    "SELECT image_id, (current_setting('hnsw.ef_search') || '.' || (current_setting('enable_seqscan') = 'off')::int"
    " || (current_setting('enable_sort') = 'off')::int"
    " || (current_setting('hnsw.iterative_scan') = 'relaxed_order')::int)::float8 FROM embeddings"
    " WHERE model_id = 1 AND category_id = {c} LIMIT 1"
)


def test_walk_settings_reach_the_workers(catalogs: Catalogs) -> None:
    """The workers plan and walk each shard: the SQL functions' walk (imsrc._walk) and the service's stage 2
    (citus_read) must have their settings in force there, and only for that statement."""
    category = _query(catalogs.citus_url, "SELECT min(category_id) FROM embeddings WHERE category_id > 0")[0][0]
    probe = WORKER_SETTINGS.format(c=category)
    walk = "SELECT score FROM imsrc._walk(%s, NULL, 321, 5)"
    for url in (catalogs.citus_url, catalogs.plain_url):
        assert _query(url, walk, (probe,)) == [(321.111,)], url
    with psycopg.connect(psycopg_url(catalogs.citus_url)) as conn:  # inside BEGIN ... COMMIT too, then put back
        assert conn.execute(walk, (probe,)).fetchall() == [(321.111,)]
        assert conn.execute(probe).fetchall()[0][1] == 40.0  # pgvector's default again, every flag off
    db = database_for(_settings(catalogs.citus_url, catalogs.data), migrate=False)
    try:
        settings = {**walk_settings(123, 10), "enable_sort": "off", "enable_seqscan": "off"}
        assert citus_read(db.engine, probe, {}, settings)[0][1] == 123.111
    finally:
        db.dispose()


def test_one_category_read_is_one_statement_on_its_worker(catalogs: Catalogs) -> None:
    """The service's one-category read (citus_category_read) is delegated whole to the category's worker: the
    coordinator sends it one statement, no BEGIN, SET or ROLLBACK (three worker round trips before), and the walk's
    settings are in force there. Inside BEGIN ... COMMIT Citus does not delegate: the function then sends its
    settings itself (same rows) and puts them back."""
    category = _query(catalogs.citus_url, "SELECT min(category_id) FROM embeddings WHERE category_id > 0")[0][0]
    probe = WORKER_SETTINGS.format(c=category)
    settings = {**walk_settings(123, 10), "enable_sort": "off", "enable_seqscan": "off"}
    db = database_for(_settings(catalogs.citus_url, catalogs.data), migrate=False)
    try:
        assert citus_category_read(db.engine, category, probe, "", settings)[0][1] == 123.111
    finally:
        db.dispose()
    params = {"c": category, "sql": probe, "q": "", "names": list(settings), "values": list(settings.values())}
    with psycopg.connect(psycopg_url(catalogs.citus_url), autocommit=True) as conn:
        commands: list[str] = []
        conn.add_notice_handler(lambda d: commands.append(d.message_primary or ""))
        conn.execute("SET citus.log_remote_commands = on")
        conn.execute("SET client_min_messages = log")
        first = conn.execute(CATEGORY_READ, params).fetchall()
        assert first[0][1] == 123.111
        sent = [c for c in commands if c.startswith("issuing ")]
        assert len(sent) == 1 and "imsrc._category_read(" in sent[0], commands
        conn.autocommit = False
        assert conn.execute(CATEGORY_READ, params).fetchall()[0][1] == 123.111  # not delegated: still in force
        assert conn.execute(probe).fetchall()[0][1] == 40.0  # and put back
        conn.rollback()
    # On the shard's worker the function reads the shard table itself: Citus' local executor (which planned the
    # query once more from a deparsed text) has nothing to run. Same row, settings in force.
    host, port = _worker_of(catalogs.citus_url, category).rsplit(":", 1)
    worker = make_url(psycopg_url(catalogs.citus_url)).set(host=host, port=int(port))
    with psycopg.connect(worker.render_as_string(hide_password=False), autocommit=True) as conn:
        commands.clear()
        conn.add_notice_handler(lambda d: commands.append(d.message_primary or ""))
        conn.execute("SET citus.log_local_commands = on")
        conn.execute("SET client_min_messages = log")
        assert conn.execute(CATEGORY_READ, params).fetchall() == [(first[0][0], 123.111)]
        assert not [c for c in commands if "locally" in c], commands


def test_search_reads_the_coordinators_own_shards_not_through_citus(catalogs: Catalogs) -> None:
    """A search's statements on the coordinator (the model row, stage 1's prototype version, the image's row for
    `similar`, the hits' rows) read the reference and Citus-local tables from the coordinator's own shards
    (db.citus.local_relations), which PostgreSQL plans alone: named by their distributed names, Citus planned each
    one, deparsed its shard query and ran that through its local executor (logged with citus.log_local_commands),
    ~0.2-0.4 ms more per statement. Same answers as one node: test_search_equals_one_node."""
    settings = _settings(catalogs.citus_url, catalogs.data)
    db = database_for(settings, migrate=False)
    commands: list[str] = []

    def log_local_commands(dbapi: Any, _record: Any) -> None:
        dbapi.add_notice_handler(lambda d: commands.append(d.message_primary or ""))
        dbapi.execute("SET citus.log_local_commands = on")
        dbapi.execute("SET client_min_messages = log")
        dbapi.commit()

    event.listen(db.engine, "connect", log_local_commands)
    try:
        runtime = SearchRuntime.create(settings)
        with db.session() as session:
            service = runtime.service(session)
            service.similar(13, SearchOptions(k=5, categories=2))  # loads what the runtime caches (prototypes)
            commands.clear()
            similar = service.similar(12, SearchOptions(k=5, categories=2))
            by_image = service.search_image(make_image(104), SearchOptions(k=4, categories=1))
            with pytest.raises(NotFoundError, match="does not exist"):
                service.similar(10**9, SearchOptions(k=5))
            # The member counts are cached for 10 s (SearchRuntime): a slow machine may read them again here.
            searched = [c for c in commands if "member_count" not in c]
            session.execute(text("SELECT count(*) FROM images"))  # through Citus: the log shows it
        assert len(similar.results) == 5 and len(by_image.results) == 4
        assert searched == [], searched
        assert [c for c in commands if "executing the command locally" in c], commands
    finally:
        db.dispose()
    assert [h.id for h in similar.results] == [
        i for i, _ in _search(catalogs.plain_url, catalogs.data, 12, SearchOptions(k=5, categories=2))
    ]


def test_stage2_read_survives_a_dropped_pooled_connection(catalogs: Catalogs) -> None:
    """The stage-2 pools (the coordinator's side pool, each worker's) do not ping a connection before each use: a
    dropped one (a restarted node, here its backend terminated) fails as broken, and the read (or the look-up of
    where the category's shard is) runs again on a new connection."""
    category = _query(catalogs.citus_url, "SELECT min(category_id) FROM embeddings WHERE category_id > 0")[0][0]
    probe = WORKER_SETTINGS.format(c=category)
    settings = {**walk_settings(77, 10), "enable_sort": "off", "enable_seqscan": "off"}
    db = database_for(_settings(catalogs.citus_url, catalogs.data), migrate=False)

    def drop_a_pooled_connection(pool: Any) -> int:
        with pool.connect() as conn:
            pid = conn.connection.driver_connection.info.backend_pid
        _query(pool.url.render_as_string(hide_password=False), "SELECT pg_terminate_backend(%s::int)", (pid,))
        return int(pid)

    def pooled_pid(pool: Any) -> int:
        with pool.connect() as conn:
            return int(conn.connection.driver_connection.info.backend_pid)

    try:
        citus.forget()  # the first read looks up its worker on the coordinator's side pool
        pid = drop_a_pooled_connection(side_engine(db.engine))
        assert citus_category_read(db.engine, category, probe, "", settings)[0][1] == 77.111
        assert pooled_pid(side_engine(db.engine)) != pid
        worker = category_workers(db.engine, [category])[category]
        assert worker is not None
        pid = drop_a_pooled_connection(worker)
        assert citus_category_read(db.engine, category, probe, "", settings)[0][1] == 77.111
        assert pooled_pid(worker) != pid
        pid = drop_a_pooled_connection(side_engine(db.engine))
        assert citus_read(db.engine, probe, {}, settings)[0][1] == 77.111
        assert pooled_pid(side_engine(db.engine)) != pid
    finally:
        db.dispose()


def test_stage2_reads_go_to_the_worker_and_through_the_coordinator_when_they_cannot(
    catalogs: Catalogs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A category's read goes straight to the worker that holds its shard (no coordinator hop). Where the service
    cannot connect to that worker, or reaches a server that is not it, it reads through the coordinator, and keeps
    doing so for a while; where the placement it knows is stale (the shard moved), the worker it asks passes the
    read on: the same row each time."""
    category = _query(catalogs.citus_url, "SELECT min(category_id) FROM embeddings WHERE category_id > 0")[0][0]
    probe = WORKER_SETTINGS.format(c=category)
    expected = [(_query(catalogs.citus_url, probe)[0][0], 123.111)]
    settings = {**walk_settings(123, 10), "enable_sort": "off", "enable_seqscan": "off"}
    holder = _worker_of(catalogs.citus_url, category)
    groups = {
        f"{h}:{p}": (str(h), int(p), int(g))
        for h, p, g in _query(catalogs.citus_url, "SELECT nodename, nodeport, groupid FROM pg_dist_node")
    }
    other = next(node for name, node in groups.items() if name != holder and node[2] > 0)
    coordinator = next(node for node in groups.values() if node[2] == 0)
    cases = [
        ("stale: another worker", other, True),
        ("nothing listens there", ("127.0.0.1", _free_port(), groups[holder][2]), False),
        ("another server answers there", (coordinator[0], coordinator[1], groups[holder][2]), False),
    ]
    db = database_for(_settings(catalogs.citus_url, catalogs.data), migrate=False)
    try:
        assert citus_category_read(db.engine, category, probe, "", settings) == expected
        worker = category_workers(db.engine, [category])[category]
        assert worker is not None and f"{worker.url.host}:{worker.url.port}" == holder
        assert worker.pool.checkedin() == 1  # the read's connection, back in the worker's pool
        for case, node, reachable in cases:
            citus.forget()
            monkeypatch.setattr(citus, "_look_up_placements", lambda *_a, n=node: {category: n})
            assert citus_category_read(db.engine, category, probe, "", settings) == expected, case
            assert (category_workers(db.engine, [category])[category] is not None) == reachable, case
    finally:
        citus.forget()
        db.dispose()


def test_similar_function_asks_only_the_shards_it_needs(catalogs: Catalogs) -> None:
    """imsrc.similar looked the image's vector up on every shard, and imsrc._search counted the catalog
    (small-catalog rule) on every shard too; now the vector comes from its category's shard and the count from
    the prototypes, as in the service."""
    with psycopg.connect(psycopg_url(catalogs.citus_url), autocommit=True) as conn:
        commands: list[str] = []
        conn.add_notice_handler(lambda d: commands.append(d.message_primary or ""))
        conn.execute("SET citus.log_remote_commands = on")
        conn.execute("SET client_min_messages = log")
        found = conn.execute("SELECT image_id FROM imsrc.similar(21, 5)").fetchall()
    vector_fetches = [c for c in commands if re.search(r"SELECT embedding FROM \S*embeddings_\d+ e WHERE", c)]
    counts = [c for c in commands if re.search(r"SELECT 1 AS \S+ FROM \S*embeddings_\d+", c)]
    assert len(found) == 5 and len(vector_fetches) == 1 and counts == [], (vector_fetches, counts)
    # An image with a near-duplicate (boats-0 and its JPEG copy, shown with include_duplicates): the
    # duplicates-first step joins the pHash candidates with the vectors of their categories' shards only, and the
    # answer is one node's.
    boat, copy = (
        _query(catalogs.citus_url, "SELECT id FROM images WHERE original_name = %s", (name,))[0][0]
        for name in ("boats-0.png", "boats-copy.jpg")
    )
    sql = "SELECT image_id, round(score::numeric, 5) FROM imsrc.similar(%s, 6, include_duplicates => true)"
    assert _query(catalogs.citus_url, sql, (boat,)) == _query(catalogs.plain_url, sql, (boat,))
    with psycopg.connect(psycopg_url(catalogs.citus_url), autocommit=True) as conn:
        commands.clear()
        conn.add_notice_handler(lambda d: commands.append(d.message_primary or ""))
        conn.execute("SET citus.log_remote_commands = on")
        conn.execute("SET client_min_messages = log")
        first = conn.execute(sql, (boat,)).fetchall()[0][0]
    # (the candidates reach the workers as an intermediate result; the k-NN part is an `ann` over every shard here:
    # the catalog is under the small-catalog threshold)
    joined = {m for c in commands if "read_intermediate_result" in c for m in re.findall(r"embeddings_(\d+)", c)}
    assert first == copy and len(joined) == 1, joined


def test_keyword_functions_on_citus(catalogs: Catalogs) -> None:
    """Citus cannot plan parameterised LANGUAGE sql functions over its tables; the migration turns the imsrc
    schema's into PL/pgSQL (captions' keyword look-ups among them), which must answer as on one server."""
    for url in (catalogs.citus_url, catalogs.plain_url):
        with psycopg.connect(psycopg_url(url)) as conn:
            conn.execute("UPDATE images SET caption = 'a red boat at sea' WHERE id IN (2, 3)")
            conn.execute("UPDATE images SET caption = 'a tabby cat' WHERE id = 12")
    queries = [
        "SELECT image_id, round(score::numeric, 5) FROM imsrc._keyword_rank(to_tsquery('english', 'boat'),"
        " 5, NULL, false)",
        "SELECT image_id, round(score::numeric, 5) FROM imsrc._keyword_hits(1, %s::vector,"
        " to_tsquery('english', 'boat | cat'), 5, NULL, false, NULL)",
    ]
    vector = _query(catalogs.plain_url, "SELECT embedding::text FROM embeddings WHERE image_id = 2")[0][0]
    assert _query(catalogs.citus_url, queries[0]) == _query(catalogs.plain_url, queries[0]) != []
    assert _query(catalogs.citus_url, queries[1], (vector,)) == _query(catalogs.plain_url, queries[1], (vector,))
    assert len(_query(catalogs.citus_url, queries[1], (vector,))) == 3
    languages = _query(
        catalogs.citus_url,
        "SELECT DISTINCT l.lanname FROM pg_proc p JOIN pg_language l ON"
        " l.oid = p.prolang WHERE p.pronamespace = 'imsrc'::regnamespace AND p.provolatile <> 'i'",
    )
    assert languages == [("plpgsql",)]


def test_faiss_and_backup_are_refused_with_the_reason(catalogs: Catalogs) -> None:
    with pytest.raises(BackendUnavailableError, match="not available on a Citus cluster"):
        _search(catalogs.citus_url, catalogs.data, 1, SearchOptions(k=3, backend="faiss"))
    done = run_cli("backup", str(catalogs.data / "b.dump"), env=_env(catalogs.citus_url, catalogs.data))
    assert done.returncode != 0 and "Citus" in done.stderr and "citus_create_restore_point" in done.stderr
    assert not (catalogs.data / "b.dump").exists()


def test_recategorise_rename_and_delete_move_the_vectors(catalogs: Catalogs) -> None:
    """Citus cannot update a distribution column: moving an image moves its vector row (delete + insert in the
    image update's transaction), whoever makes the change (here plain SQL, as the API and regrouping do)."""
    url = catalogs.citus_url
    with psycopg.connect(psycopg_url(url)) as conn:
        boats, cats = (
            conn.execute("SELECT id FROM categories WHERE name = %s", (n,)).fetchone()[0]  # type: ignore[index]
            for n in ("boats", "cats")
        )
        image = conn.execute(
            "SELECT id FROM images WHERE category_id = %s ORDER BY id DESC LIMIT 1", (boats,)
        ).fetchone()[0]  # type: ignore[index]
        vector = conn.execute("SELECT embedding::text FROM embeddings WHERE image_id = %s", (image,)).fetchone()
        conn.execute("UPDATE images SET category_id = %s WHERE id = %s", (cats, image))
        rows = conn.execute(
            "SELECT category_id, embedding::text FROM embeddings WHERE image_id = %s", (image,)
        ).fetchall()
        assert rows == [(cats, vector[0])]  # type: ignore[index]
        # Uncategorised (category 0 on the shards, NULL in the views) and back.
        conn.execute("UPDATE images SET category_id = NULL WHERE id = %s", (image,))
        assert conn.execute("SELECT category_id FROM catalog_embeddings WHERE image_id = %s", (image,)).fetchall() == [
            (None,)
        ]
        conn.execute("UPDATE images SET category_id = %s WHERE id = %s", (boats, image))
        conn.commit()
    options = SearchOptions(k=3, mode="exact", category=["boats"], include_duplicates=True)
    found = _search(url, catalogs.data, image, options)
    assert len(found) == 3
    # Renaming a category changes no id; the API keeps working on it.
    settings = _settings(url, catalogs.data)
    with TestClient(create_app(settings)) as client:
        renamed = client.patch(f"/api/categories/{boats}", json={"name": "ships"})
        assert renamed.status_code == 200, renamed.text
        hits = client.get(f"/api/search/similar/{image}", params={"k": 3, "category": "ships"}).json()["results"]
        assert len(hits) == 3 and all(h["category"] == "ships" for h in hits)
        client.patch(f"/api/categories/{boats}", json={"name": "boats"})
        # Deleting an image deletes its vector (Citus allows no foreign key from the shards to images).
        victim = _query(url, "SELECT max(id) FROM images")[0][0]
        assert client.delete(f"/api/images/{victim}").status_code == 200
    assert _query(url, "SELECT count(*) FROM embeddings WHERE image_id = %s", (victim,)) == [(0,)]


def test_embedding_an_image_while_it_is_recategorised_keeps_its_vector_with_it(catalogs: Catalogs) -> None:
    """Embedding an existing image (embed-missing) reads its category, then COPYs its vector to that shard; a
    re-categorisation committed in between used to move nothing (the vector was not committed yet) and leave the
    vector under the old category. Now the re-categorisation waits for the embedding's transaction and moves it."""
    url = catalogs.citus_url
    image, old, new, vector = _query(
        url,
        "SELECT e.image_id, e.category_id, (SELECT id FROM categories WHERE id <> e.category_id ORDER BY id LIMIT 1),"
        " e.embedding::text FROM embeddings e WHERE e.category_id <> 0 ORDER BY e.image_id DESC LIMIT 1",
    )[0]
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        conn.execute("DELETE FROM embeddings WHERE image_id = %s", (image,))  # the image now lacks its vector
    db = database_for(_settings(url, catalogs.data), migrate=False)
    moved: list[float] = []

    def recategorise() -> None:
        with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
            started = time.monotonic()
            conn.execute("UPDATE images SET category_id = %s WHERE id = %s", (new, image))
            moved.append(time.monotonic() - started)

    try:
        with db.session() as session:
            IngestRepository(session).copy_embeddings(1, [(image, np.array(json.loads(vector), dtype=np.float32))])
            mover = threading.Thread(target=recategorise)
            mover.start()
            time.sleep(1.0)  # the UPDATE is sent while the embedding's transaction is still open
            assert not moved, "the re-categorisation did not wait for the embedding's transaction"
            session.commit()
        mover.join(60)
    finally:
        db.dispose()
    assert moved
    rows = _query(
        url,
        "SELECT e.category_id, i.category_id FROM embeddings e JOIN images i ON i.id = e.image_id"
        " WHERE e.image_id = %s",
        (image,),
    )
    assert rows == [(new, new)]
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        conn.execute("UPDATE images SET category_id = %s WHERE id = %s", (old, image))  # as it was


def test_uploads_on_citus(catalogs: Catalogs) -> None:
    """POST /api/images through the coordinator: into a named category and uncategorised (an automatic group),
    each vector on its category's shard; the upload is found by the next search."""
    with TestClient(create_app(_settings(catalogs.citus_url, catalogs.data))) as client:
        named = client.post(
            "/api/images", data={"category": "trees"}, files=[("file", ("t.png", make_image(4242), "image/png"))]
        )
        loose = client.post("/api/images", files=[("file", ("u.png", make_image(4343), "image/png"))])
        assert named.status_code == 200 and loose.status_code == 200, (named.text, loose.text)
        ids = [named.json()["results"][0]["id"], loose.json()["results"][0]["id"]]
        found = client.get(f"/api/search/similar/{ids[0]}", params={"k": 3, "category": "trees"})
        assert found.status_code == 200 and len(found.json()["results"]) == 3
    rows = _query(
        catalogs.citus_url,
        "SELECT e.image_id, e.category_id, i.category_id FROM embeddings e"
        " JOIN images i ON i.id = e.image_id WHERE e.image_id = ANY(%s) ORDER BY 1",
        (ids,),
    )
    assert [r[0] for r in rows] == ids and all(r[1] == r[2] and r[1] for r in rows)


def test_ingest_resumes_after_sigkill_on_citus(citus_cluster: CitusCluster, catalogs: Catalogs) -> None:
    """COPY into the shards, SIGKILL mid-run, the same command again: the catalog equals the module's one-node
    catalog of the same folder, indexed without interruption (rows, vectors, duplicate links, prototypes), and
    no image has two vector rows."""
    citus_url = citus_cluster.create_database()
    env_citus = cli_env(citus_url, catalogs.data)  # `imsrc index` migrates the new database itself
    proc = subprocess.Popen(
        index_command(catalogs.folder), env=env_citus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    with psycopg.connect(psycopg_url(citus_url), autocommit=True) as conn:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            migrated = conn.execute("SELECT to_regclass('images') IS NOT NULL").fetchone()[0]  # type: ignore[index]
            if migrated and conn.execute("SELECT count(*) FROM images").fetchone()[0] >= 8:  # type: ignore[index]
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        status = conn.execute("SELECT status FROM ingest_jobs").fetchone()[0]  # type: ignore[index]
    assert status == "running", "the indexer finished before it could be killed"
    resumed = subprocess.run(
        index_command(catalogs.folder), env=env_citus, capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed"] is True
    a = catalogs.plain_snapshot
    b = snapshot(database_for(_settings(citus_url, catalogs.data), migrate=False))
    for key in ("images", "sources", "prototypes", "categories"):
        assert a[key] == b[key], key
    assert a["vectors"].keys() == b["vectors"].keys()
    assert all(np.array_equal(a["vectors"][k], b["vectors"][k]) for k in a["vectors"])
    assert _query(citus_url, "SELECT count(*) - count(DISTINCT (model_id, image_id)) FROM embeddings") == [(0,)]


def _worker_of(url: str, category_id: int) -> str:
    return str(
        _query(
            url,
            "SELECT n.nodename || ':' || n.nodeport FROM pg_dist_shard_placement n WHERE n.shardid ="
            " get_shard_id_for_distribution_column('embeddings', %s)",
            (category_id,),
        )[0][0]
    )


def test_worker_down_answers_503_naming_it_and_other_categories_still_answer(
    citus_cluster: CitusCluster, catalogs: Catalogs
) -> None:
    local = citus_cluster.require_local()
    url = catalogs.citus_url
    ids = dict(_query(url, "SELECT name, id FROM categories"))
    placed = {name: _worker_of(url, cid) for name, cid in ids.items()}
    if len(set(placed.values())) < 2:
        pytest.skip(f"every category hashed to one worker ({placed}); nothing to contrast")
    down_name = next(iter(placed))
    down = placed[down_name]
    up_name = next(n for n, w in placed.items() if w != down)
    node = next(n for n in local.workers if f"127.0.0.1:{n.port}" == down)
    settings = _settings(url, catalogs.data)
    with TestClient(create_app(settings)) as client:
        image_up = _query(url, "SELECT min(id) FROM images WHERE category_id = %s", (ids[up_name],))[0][0]
        before = client.get(f"/api/search/similar/{image_up}", params={"k": 3, "category": up_name}).json()
        local.stop(node, "immediate")
        try:
            answer = client.get(f"/api/search/similar/{image_up}", params={"k": 3, "category": up_name})
            assert answer.status_code == 200, answer.text
            assert [h["id"] for h in answer.json()["results"]] == [h["id"] for h in before["results"]]
            failed = client.get(f"/api/search/similar/{image_up}", params={"k": 3, "category": down_name})
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["code"] == "node_unavailable"
            assert failed.json()["error"]["node"] == down and down in failed.json()["error"]["message"]
            every = client.get(f"/api/search/similar/{image_up}", params={"k": 3, "mode": "ann"})
            assert every.status_code == 503 and every.json()["error"]["node"] == down  # never a shorter list
            status = client.get("/api/status")
            assert status.status_code == 200, status.text
            nodes = {n["node"]: n for n in status.json()["cluster"]["nodes"]}
            assert nodes[down]["reachable"] is False and nodes[down]["role"] == "worker"
            assert sum(n["reachable"] for n in nodes.values()) == len(nodes) - 1
        finally:
            local.start(node)
        deadline = time.monotonic() + 30
        while client.get(f"/api/search/similar/{image_up}", params={"k": 3, "category": down_name}).status_code != 200:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.5)
        nodes = client.get("/api/status").json()["cluster"]["nodes"]
        assert all(n["reachable"] for n in nodes) and sum(n["shards"] for n in nodes) > 0


def test_add_worker_and_rebalance_keep_the_results(citus_cluster: CitusCluster, catalogs: Catalogs) -> None:
    local = citus_cluster.require_local()
    url = catalogs.citus_url
    before = {str(o): _search(url, catalogs.data, 12, o) for o in SEARCHES}
    database = psycopg_url(url).rsplit("/", 1)[1]
    new = local.add_worker(database)
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        conn.execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
        conn.execute("SELECT citus_rebalance_wait()")
        moved = conn.execute(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid) JOIN pg_dist_node n"
            " ON n.groupid = p.groupid WHERE s.logicalrelid = 'embeddings'::regclass AND n.nodeport = %s",
            (new.port,),
        ).fetchone()[0]  # type: ignore[index]
    assert moved > 0  # the new worker holds shards now
    after = {str(o): _search(url, catalogs.data, 12, o) for o in SEARCHES}
    assert after == before
