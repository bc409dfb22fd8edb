"""Stage-2 planner settings on a brand-new connection, before pgvector's library is loaded in that backend.

The web page's text search failed with 500 `unrecognized configuration parameter "hnsw.ef_search"` whenever the
pool handed it a connection that had not used a vector yet."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.db.engine import make_engine
from imsrc.search.pg_queries import NeighbourRepository


def test_per_category_on_a_fresh_connection(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)  # a new pool: its first connection is a new backend
    try:
        with Session(engine) as session:
            hits = NeighbourRepository(session).per_category(
                987654, 3, "[1,0,0]", [(987654, True)], limit=5, ef_search=40
            )
            assert hits == []
            # the settings are back to the server defaults afterwards
            assert session.execute(text("SELECT current_setting('enable_seqscan')")).scalar() == "on"
            assert session.execute(text("SELECT current_setting('hnsw.ef_search')")).scalar() == "40"
    finally:
        engine.dispose()
