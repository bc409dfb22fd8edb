"""imsrc._search_source: what a search reads before its stages (the model row, the prototype version, and for "more
like this" the image's vector and pHash) from one function whose plan PostgreSQL keeps per connection.

Revision ID: 0019_search_source
Revises: 0018_halfvec_walks
Create Date: 2026-12-08 01:00

Why: the service read these with one ORM statement of four subqueries per search. On the 3,000-image real catalog
(bench/search/overhead_probe.py's) that statement took 0.32 ms bare, 0.2 of it planning, and 0.75 ms through the ORM;
the same work as this function, called through SQLAlchemy Core, 0.2 ms. The connections do not prepare statements
(db.engine.CONNECT_ARGS: generic plans walked the graphs slower), but a PL/pgSQL function keeps the plan of its own
query for the connection, and this query is a handful of primary-key look-ups for which a generic plan is right.
The version expression must stay the same text as catalog.prototypes.prototype_version_sql (tests compare them).
On Citus the service keeps reading the coordinator's own shards instead (search.repository.VectorRepository).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019_search_source"
down_revision: str | None = "0018_halfvec_walks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_SOURCE = """
CREATE FUNCTION imsrc._search_source(p_model text, p_image bigint, p_version boolean)
RETURNS TABLE (id integer, name text, dimension integer, family text, params jsonb, supports_text boolean,
               is_active boolean, created_at timestamptz, image_exists boolean, vector bytea, phash bigint,
               version text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- p_model NULL: the active model; p_image NULL: no image (a search by image or text)
    RETURN QUERY
    SELECT m.id, m.name, m.dimension, m.family, m.params, m.supports_text, m.is_active, m.created_at,
           EXISTS (SELECT 1 FROM images i WHERE i.id = p_image),
           (SELECT vector_send(e.embedding) FROM embeddings e WHERE e.model_id = m.id AND e.image_id = p_image),
           (SELECT i.phash::bigint FROM images i WHERE i.id = p_image),
           CASE WHEN p_version THEN
               (SELECT ROW(count(*), max(p.updated_at), coalesce(sum(p.id), 0), coalesce(sum(hashtext(c.name)), 0),
                       (SELECT s.updated_at FROM search_state s WHERE s.key = 'stage1:m' || m.id))::text
                  FROM category_prototypes p JOIN categories c ON c.id = p.category_id WHERE p.model_id = m.id)
           END
      FROM embedding_models m
     WHERE CASE WHEN p_model IS NULL THEN m.is_active ELSE m.name = p_model END;
END
$$;
"""


def upgrade() -> None:
    op.execute(SEARCH_SOURCE)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS imsrc._search_source(text, bigint, boolean)")
