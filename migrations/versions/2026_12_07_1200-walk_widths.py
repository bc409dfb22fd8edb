"""The SQL functions walk each category as wide as search sync calibrated it (search/walks.py).

Revision ID: 0015_walk_widths
Revises: 0014_stage1_fallback
Create Date: 2026-12-07 12:00

Why: a category's walk was at least 2 sqrt(rows) wide (imsrc.ef_search at least), a rule fitted on isotropic
data; on real embeddings it walked 50k-row categories at ef 448 where ef 40 found the same rows. Search sync now
measures each indexed category's width on its own members and stores it in search_state (walks:m<model id>).
The service reads it there; imsrc._neighbours must read the same, or imsrc.search/imsrc.similar would walk
wider than the API and answer differently.

imsrc._walk_ef(model, category, index rows, base) is the one place the SQL side computes a near category's
width: the calibrated ef widened by sqrt(growth since calibration), or the size rule where none is stored
(pg_queries.category_ef_search, the same float8 arithmetic). imsrc._neighbours is taken as the database holds
it (plain PostgreSQL and a Citus coordinator hold different shapes of it since 0013) and only its width
expression is replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0015_walk_widths"
down_revision: str | None = "0014_stage1_fallback"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEIGHBOURS = "imsrc._neighbours(integer, integer, vector, integer, bigint[], bigint[], text)"
OLD_WIDTH = "least(1000, greatest(base, ceil(2 * sqrt(index_rows))::int))"
NEW_WIDTH = "imsrc._walk_ef(p_model_id, category_id, index_rows, base)"

WALK_EF = """
CREATE FUNCTION imsrc._walk_ef(p_model_id int, p_category_id bigint, p_rows bigint, p_base int) RETURNS int
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w jsonb;
BEGIN
    SELECT s.value -> p_category_id::text INTO w FROM search_state s WHERE s.key = 'walks:m' || p_model_id;
    IF w IS NULL OR jsonb_typeof(w -> 'ef') IS DISTINCT FROM 'number'
       OR jsonb_typeof(w -> 'rows') IS DISTINCT FROM 'number' THEN
        RETURN least(1000, greatest(p_base, ceil(2 * sqrt(p_rows))::int));
    END IF;
    RETURN least(1000, ceil((w ->> 'ef')::int
                            * sqrt(greatest(1.0::float8, p_rows::float8 / greatest((w ->> 'rows')::float8, 1)))))::int;
END
$$;
"""

GRANTS = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
    END IF;
END
$$;
"""


def _swap(old: str, new: str) -> None:
    conn = op.get_bind()
    definition = str(conn.execute(text(f"SELECT pg_get_functiondef('{NEIGHBOURS}'::regprocedure)")).scalar())
    if definition.count(old) != 1:
        raise RuntimeError(f"imsrc._neighbours is not the function this revision expects (looked for {old!r})")
    op.execute(definition.replace(old, new))


def upgrade() -> None:
    op.execute(WALK_EF)
    _swap(OLD_WIDTH, NEW_WIDTH)
    op.execute(GRANTS)


def downgrade() -> None:
    _swap(NEW_WIDTH, OLD_WIDTH)
    op.execute("DROP FUNCTION imsrc._walk_ef(integer, bigint, bigint, integer)")
    op.execute("DELETE FROM search_state WHERE key LIKE 'walks:m%'")
