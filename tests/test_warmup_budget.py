"""The warm-up's pg_prewarm (search/warmup.py) fills shared_buffers in order of use and stops at its budget: the
per-category graphs, then the model's graph over all rows, then the partitions and the embeddings heap; what
does not fit is read into the OS page cache only, so a catalog larger than the cache keeps the graphs cached."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import global_index_name
from imsrc.config import Settings
from imsrc.search.pg_queries import INDEX_PREFIX, category_index_name, partition_name
from imsrc.search.sync import sync_search
from imsrc.search.warmup import PREWARM_SHARE, PrewarmBudget, _relations, prewarm, prewarm_search_relations

from .search_data import make_catalog


def _names(session: Session, oids: list[int]) -> list[str]:
    return [
        str(session.execute(text("SELECT CAST(:o AS bigint)::oid::regclass::text"), {"o": o}).scalar()) for o in oids
    ]


def _cached_blocks(session: Session, name: str) -> set[int]:
    rows = session.execute(
        text(
            "SELECT relblocknumber FROM pg_buffercache WHERE relfilenode = pg_relation_filenode(CAST(:n AS regclass))"
            " AND reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"n": name},
    ).all()
    return {int(r[0]) for r in rows}


def test_prewarm_fills_the_budget_in_order_of_use(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=2, per_category=600, dimension=64, name="prewarm", spread=0.5)
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 100}), model_id=cat.model.id)
    model_id = cat.model.id
    first, second = sorted(cat.category_ids)
    # Indexes of other models whose names start alike (m1 vs m10, m1x): not this model's to warm.
    for other in (f"{INDEX_PREFIX}_m{model_id}0_c{first}", f"{INDEX_PREFIX}_m{model_id}x_c{first}"):
        session.execute(text(f"CREATE INDEX {other} ON embeddings (image_id)"))
    graphs = _relations(session, model_id, heap=False)
    assert _names(session, [o for o, _ in graphs]) == [
        category_index_name(model_id, first),
        category_index_name(model_id, second),
        global_index_name(model_id),
    ]
    heaps = _names(session, [o for o, _ in _relations(session, model_id, heap=True)])
    assert heaps[-1] == "embeddings" and set(heaps[:-1]) >= {partition_name(first), partition_name(second)}

    sizes = [b for _, b in graphs]
    assert all(sizes)
    session.execute(text("CREATE EXTENSION IF NOT EXISTS pg_buffercache"))
    if session.execute(text("SELECT to_regproc('pg_buffercache_evict_all')")).scalar() is None:
        pytest.skip("pg_buffercache_evict_all needs PostgreSQL 18")
    session.execute(text("SELECT pg_buffercache_evict_all()"))
    # A budget that holds the first graph and part of the second: the third is only read, not cached.
    budget = PrewarmBudget(sizes[0] + 2)
    read = prewarm(session, model_id, heap=False, budget=budget)
    assert read == sum(sizes) * 8192
    assert budget.blocks == 0
    assert _cached_blocks(session, category_index_name(model_id, first)) == set(range(sizes[0]))
    assert _cached_blocks(session, category_index_name(model_id, second)) == {0, 1}
    assert _cached_blocks(session, global_index_name(model_id)) == set()


def test_a_fresh_budget_is_a_share_of_shared_buffers(session: Session, settings: Settings) -> None:
    size = session.execute(text("SELECT pg_size_bytes(current_setting('shared_buffers'))")).scalar_one()
    assert PrewarmBudget.of(session).blocks == int(int(size) * PREWARM_SHARE) // 8192
    cat = make_catalog(session, n_categories=2, per_category=300, dimension=32, name="prewarm-all", spread=0.5)
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 100}), model_id=cat.model.id)
    relations = _relations(session, cat.model.id, heap=False) + _relations(session, cat.model.id, heap=True)
    assert prewarm_search_relations(session, cat.model.id) == sum(b for _, b in relations) * 8192
