"""Warm what the first searches need, in the background after the server starts (never before /health).

Without it the first query after a restart pays for everything at once: the prototype matrix read, the FAISS
index load or build (seconds on a big catalog), PostgreSQL reading the embeddings and their HNSW graphs from
disk, and loading the model (with IMSRC_INFERENCE=auto|onnx on a new install, its one-time ONNX export).
Warming is best effort: a failure is logged and searches simply warm things on first use, as before.

Order: what every search touches first and cheaply (the prototypes, then one real `similar` search through the
service: the pooled connection, SQLAlchemy's compiled statements, the per-category index list, the plans and the
index pages one query needs), then the HNSW indexes, the model, and last the embeddings heap (the biggest read).
/health/ready reports `search_warm` once it is all done, so a balancer can hold traffic until then.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from imsrc.catalog.repository import ModelRepository, global_index_name
from imsrc.db.citus import distributed
from imsrc.db.session import Database
from imsrc.search.pg_queries import INDEX_PREFIX, ON_VECTOR_TABLES
from imsrc.search.service import SearchRuntime

log = logging.getLogger(__name__)


@dataclass
class WarmReport:
    done: threading.Event = field(default_factory=threading.Event)
    model: str | None = None
    prewarmed_bytes: int = 0
    faiss_loaded: bool = False
    searched: bool = False  # one real search ran through the service
    inference: str | None = None  # the engines of the loaded model, once loaded
    seconds: float = 0.0
    error: str | None = None


def prewarm_available(session: Session) -> bool:
    """Whether pg_prewarm is installed, creating it where allowed (it needs rights a catalog role may lack)."""
    if session.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'pg_prewarm'")).scalar() is not None:
        return True
    try:
        with session.begin_nested():
            session.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
    except SQLAlchemyError:
        return False
    return True


# Of shared_buffers, what the warm-up fills: the rest is left to what searches read besides (catalog rows,
# thumbnails, another model's pages).
PREWARM_SHARE = 0.8
BLOCK = 8192
_OID = "CAST(CAST(:o AS bigint) AS oid)"


@dataclass
class PrewarmBudget:
    """Blocks of shared_buffers the warm-up may still fill. A catalog larger than the cache is warmed in order of
    use, each relation into shared_buffers while it fits and the rest only into the OS page cache: prewarming all
    of a 1M catalog (22 GB at 1280-d) into 4 GB of buffers left them holding the embeddings heap, read last, and
    evicted every graph a search walks."""

    blocks: int

    @classmethod
    def of(cls, session: Session) -> PrewarmBudget:
        size = session.execute(text("SELECT pg_size_bytes(current_setting('shared_buffers'))")).scalar_one()
        return cls(int(int(size) * PREWARM_SHARE) // BLOCK)


def _relations(session: Session, model_id: int, *, heap: bool) -> list[tuple[int, int]]:
    """(oid, blocks) of what a search of the model reads, most used first. Indexes: the per-category graphs (every
    two-stage search walks some), then the model's graph over all its rows (`ann`, and stage 1's fallback).
    Heap: the partitions the walks find and score rows in (category_vectors, migration 0013), then embeddings (the
    rows `ann` finds, the query vector of `similar`, and exact scans)."""
    if heap:
        where = (
            "(c.oid = 'embeddings'::regclass OR c.oid IN (SELECT inhrelid FROM pg_inherits "
            "WHERE inhparent = to_regclass('category_vectors')))"
        )
        order = "c.oid = 'embeddings'::regclass"
    else:
        where = (
            "c.oid IN (SELECT x.indexrelid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            f"WHERE {ON_VECTOR_TABLES} AND (i.relname LIKE :p OR i.relname = :g))"
        )
        order = "c.relname = :g"
    rows = session.execute(
        text(
            # length first: ..._c9 before ..._c10, categories in id order
            f"SELECT c.oid, pg_relation_size(c.oid) / {BLOCK} FROM pg_class c WHERE {where} "
            f"ORDER BY {order}, length(c.relname), c.relname"
        ),
        {"p": f"{INDEX_PREFIX}_m{int(model_id)}\\_c%", "g": global_index_name(model_id)},
    ).all()
    return [(int(r[0]), int(r[1])) for r in rows]


def _prewarm_range(session: Session, oid: int, mode: str, first: int, last: int) -> int:
    """pg_prewarm of blocks first..last of a relation, clamped to its size now (a VACUUM may have truncated it
    since it was measured); blocks read."""
    return int(
        session.execute(
            text(
                f"SELECT coalesce(sum(pg_prewarm({_OID}, :mode, 'main', CAST(:f AS bigint),"
                f" LEAST(CAST(:l AS bigint), n - 1))), 0) FROM (SELECT pg_relation_size({_OID}) / {BLOCK} AS n) s"
                " WHERE LEAST(CAST(:l AS bigint), n - 1) >= CAST(:f AS bigint)"
            ),
            {"o": oid, "mode": mode, "f": first, "l": last},
        ).scalar_one()
    )


def prewarm(session: Session, model_id: int, *, heap: bool, budget: PrewarmBudget | None = None) -> int:
    """pg_prewarm the model's HNSW indexes (heap False) or the tables they point into (heap True): into
    shared_buffers while `budget` lasts (none given: a fresh one, shared_buffers x PREWARM_SHARE), the rest into the
    OS page cache. Bytes read; 0 without pg_prewarm."""
    if not prewarm_available(session):
        return 0
    budget = budget or PrewarmBudget.of(session)
    read = 0
    for oid, blocks in _relations(session, model_id, heap=heap):
        cached = min(blocks, budget.blocks)
        if cached:
            read += _prewarm_range(session, oid, "buffer", 0, cached - 1)
            budget.blocks -= cached
        if cached < blocks:
            read += _prewarm_range(session, oid, "read", cached, blocks - 1)
    return read * BLOCK


def prewarm_search_relations(session: Session, model_id: int) -> int:
    """The model's HNSW indexes, then the tables they point into, in one budget; bytes read."""
    budget = PrewarmBudget.of(session)
    return prewarm(session, model_id, heap=False, budget=budget) + prewarm(session, model_id, heap=True, budget=budget)


def _one_search(database: Database, runtime: SearchRuntime, model_id: int) -> bool:
    """A `similar` search on one of the model's images with the default options, as a first request would run."""
    from imsrc.search.repository import VectorRepository
    from imsrc.search.schemas import SearchOptions

    try:
        with database.session() as session:
            low, _ = VectorRepository(session).id_range(model_id)
            if low is None:
                return False
            runtime.service(session).similar(low, SearchOptions())
    except Exception as exc:  # e.g. the image was deleted meanwhile: warm the rest anyway
        log.info("search warm-up: the first search failed (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def warm(database: Database, runtime: SearchRuntime, report: WarmReport) -> None:
    started = time.perf_counter()
    try:
        with database.session() as session:
            model = ModelRepository(session).active()
            if model is None:
                return
            report.model = model.name
            model_id, name = model.id, model.name
            if ModelRepository(session).global_index_half(model.id) is False:
                log.warning(
                    "model %s's HNSW graph over every image is on full-precision vectors (made before schema "
                    "revision 0018): %s to rebuild it on halfvec, half the pages",
                    name,
                    "on Citus, rebuild it by hand (db/README.md)"
                    if distributed(session)
                    else "run `imsrc categories sync` once",
                )
            runtime.prototypes.get(session, model.id)
            if runtime.settings.search_backend == "faiss":
                runtime.faiss.get(session, model)
                report.faiss_loaded = True
        report.searched = _one_search(database, runtime, model_id)
        # With FAISS answering searches, pgvector's graphs and tables are not what they read: warming them would
        # only push the FAISS files' pages out of the OS cache (at 1M: a 22 GB catalog, a 5 GB index, 24 GB).
        pgvector = runtime.settings.search_backend != "faiss"
        budget = PrewarmBudget(0)
        if pgvector:
            with database.session() as session:
                budget = PrewarmBudget.of(session)
                report.prewarmed_bytes = prewarm(session, model_id, heap=False, budget=budget)
        # Image queries are hashed for the duplicates-first look-up: imagehash loads scipy (~0.17 s) on first use.
        from PIL import Image

        from imsrc.imaging import phash64

        phash64(Image.new("RGB", (32, 32)))
        # The model: slow, and it needs no session. Image queries then find a warm inference session.
        from imsrc.embeddings.runtime import describe  # torch loads here, in the background, not at import

        embedder = runtime.embedder_factory(name)
        engines = getattr(embedder, "runtime", None)
        report.inference = describe(engines) if isinstance(engines, dict) else None
        if pgvector:
            with database.session() as session:  # the biggest read last: the rows a search hydrates and re-scores
                report.prewarmed_bytes += prewarm(session, model_id, heap=True, budget=budget)
        # Loading the model created hundreds of thousands of long-lived objects (torch, onnx); without this the
        # first request's allocations trigger a full collection that walks them all. Collect once here, in the
        # background, and move the survivors out of the collector's way.
        gc.collect()
        gc.freeze()
    except Exception as exc:  # best effort: searches warm what they need on first use anyway
        report.error = f"{type(exc).__name__}: {exc}"
        log.warning("search warm-up failed (first searches will be slower): %s", report.error)
    finally:
        report.seconds = time.perf_counter() - started
        report.done.set()
        log.info("search warm-up: %s", report)


def start(database: Database, runtime: SearchRuntime) -> WarmReport:
    report = WarmReport()
    threading.Thread(target=warm, args=(database, runtime, report), name="imsrc-search-warmup", daemon=True).start()
    return report
