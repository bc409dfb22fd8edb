"""The SQL functions walk the model's own graph as wide as search sync calibrated it (search/walks.py).

Revision ID: 0016_ann_width
Revises: 0015_walk_widths
Create Date: 2026-12-07 13:00

Why: mode `ann`, and every two-stage query stage 1 does not narrow, walk the per-model HNSW graph at
imsrc.ef_search (100) whatever the data. At 1M real-calibrated vectors ef 40 reached recall@10 1.000; ef 100
walked twice the graph, most of it beyond shared_buffers (87 ms p50 against 5.9 ms, bench/search). Search sync
now measures the graph's width on members of the whole model (walks:m<model id>:ann in search_state); the
service reads it there, and imsrc._neighbours must read the same, or imsrc.search would walk wider than the API.

imsrc._ann_ef(model, base) is the SQL side of SearchRuntime.ann_ef: the calibrated ef, or `base`
(imsrc.ef_search) where none is stored (search sync fits it again once the model's rows doubled or halved).
imsrc._neighbours is taken as the database holds it (plain PostgreSQL and a Citus coordinator hold different
shapes of it since 0013) and only the width of its whole-model branch is replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0016_ann_width"
down_revision: str | None = "0015_walk_widths"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEIGHBOURS = "imsrc._neighbours(integer, integer, vector, integer, bigint[], bigint[], text)"
OLD_WIDTH = "p_query, base, p_limit) w"
NEW_WIDTH = "p_query, imsrc._ann_ef(p_model_id, base), p_limit) w"

ANN_EF = """
CREATE FUNCTION imsrc._ann_ef(p_model_id int, p_base int) RETURNS int
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT CASE WHEN jsonb_typeof(s.value -> 'ef') = 'number'
                                  AND jsonb_typeof(s.value -> 'rows') = 'number'
                                 THEN least(1000, (s.value ->> 'ef')::int) END
                       FROM search_state s WHERE s.key = format('walks:m%s:ann', p_model_id)), p_base)
$$;
"""


def grant(function: str) -> None:
    """EXECUTE on one function for the read-only role, where there is one (0017 uses this too)."""
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN"
        f" EXECUTE 'GRANT EXECUTE ON FUNCTION {function} TO imsrc_reader'; END IF; END $$"
    )


def swap(function: str, old: str, new: str) -> None:
    """Replace `old` (which must occur exactly once) by `new` in a function as the database holds it (0017 uses
    this too)."""
    conn = op.get_bind()
    definition = str(conn.execute(text(f"SELECT pg_get_functiondef('{function}'::regprocedure)")).scalar())
    if definition.count(old) != 1:
        raise RuntimeError(f"{function} is not the function this revision expects (looked for {old!r})")
    op.execute(definition.replace(old, new))


def upgrade() -> None:
    op.execute(ANN_EF)
    swap(NEIGHBOURS, OLD_WIDTH, NEW_WIDTH)
    grant("imsrc._ann_ef(integer, integer)")


def downgrade() -> None:
    swap(NEIGHBOURS, NEW_WIDTH, OLD_WIDTH)
    op.execute("DROP FUNCTION imsrc._ann_ef(integer, integer)")
    op.execute(r"DELETE FROM search_state WHERE key LIKE 'walks:m%\:ann'")  # \: a colon, not a bind parameter
