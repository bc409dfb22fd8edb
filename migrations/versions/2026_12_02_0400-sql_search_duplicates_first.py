"""imsrc.similar / imsrc.similar_in put the image's pHash near-duplicates first, as the service now does.

Revision ID: 0007_sql_search_duplicates_first
Revises: 0006_phash_bands
Create Date: 2026-12-02 04:00

Why: since issue 18 the service's `similar` lists catalog images whose perceptual hash is within
IMSRC_DUPLICATE_THRESHOLD of the query image's first (closest first, then by cosine), whatever stage 1 picked
(service._duplicates_first, search/duplicates.py). The SQL functions of 0005 must give the same ids in the same
order, so they do the same: the threshold is the custom setting `imsrc.duplicate_threshold` (default 4, like
the service's), and the look-up probes the band indexes of 0006 while the radius per band is small.
imsrc.search takes a vector, which has no pHash: like the service's text search, it has no such step.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_sql_search_duplicates_first"
down_revision: str | None = "0006_phash_bands"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
-- Every 16-bit value within p_radius bits of p_value (duplicates.within), for the band probes.
CREATE FUNCTION imsrc._band_values(p_value int, p_radius int) RETURNS int[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(DISTINCT x) FROM (
        SELECT p_value AS x
        UNION ALL SELECT p_value # (1 << b) FROM generate_series(0, 15) b WHERE p_radius >= 1
        UNION ALL SELECT p_value # (1 << b1) # (1 << b2)
                    FROM generate_series(0, 15) b1, generate_series(0, 15) b2 WHERE p_radius >= 2 AND b1 < b2
    ) s
$$;

-- service._duplicates_first: near-duplicates of the query image by pHash first (DuplicateSearchRepository.near),
-- then the ranked hits not already among them, k in all.
CREATE FUNCTION imsrc._duplicates_first(p_model_id int, p_query vector, p_image bigint, p_k int,
                                        p_categories bigint[], p_include_duplicates boolean,
                                        p_ids bigint[], p_scores double precision[])
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    ph bit(64);
    threshold int := imsrc._setting('duplicate_threshold', 4)::int;
    cond text := 'phash IS NOT NULL AND bit_count(phash # $1) <= $2';
    near_ids bigint[];
    near_scores double precision[];
BEGIN
    SELECT i.phash INTO ph FROM images i WHERE i.id = p_image;
    IF ph IS NOT NULL THEN
        IF threshold / 4 <= 2 THEN  -- duplicates.MAX_BAND_RADIUS: beyond it a scan is cheaper than the probes
            SELECT cond || ' AND (' || string_agg(format('(((phash::bigint >> %s) & 65535)::int) = ANY(%L::int[])',
                       48 - 16 * b, imsrc._band_values(((ph::bigint >> (48 - 16 * b)) & 65535)::int, threshold / 4)),
                       ' OR ') || ')'
              INTO cond FROM generate_series(0, 3) b;
        END IF;
        EXECUTE format(
            'SELECT array_agg(x.target ORDER BY x.o), array_agg(x.score ORDER BY x.o) FROM ('
            ' SELECT t.target, 1 - (e.embedding <=> $3) AS score,'
            '        row_number() OVER (ORDER BY t.d, 1 - (e.embedding <=> $3) DESC, t.target) AS o'
            '   FROM (SELECT %s AS target, min(bit_count(phash # $1)) AS d FROM images WHERE %s GROUP BY 1) t'
            '   JOIN embeddings e ON e.image_id = t.target AND e.model_id = %s'
            '  WHERE t.target <> $4 %s) x WHERE x.o <= %s',
            CASE WHEN p_include_duplicates THEN 'id' ELSE 'coalesce(canonical_id, id)' END, cond, p_model_id,
            CASE WHEN p_categories IS NULL THEN '' ELSE 'AND e.category_id = ANY($5)' END, p_k)
            INTO near_ids, near_scores USING ph, threshold, p_query, coalesce(p_image, 0), p_categories;
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
$$;

CREATE OR REPLACE FUNCTION imsrc.similar(image bigint, k int DEFAULT 10, categories int DEFAULT NULL,
                                         mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                         include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
    v vector;
    ids bigint[];
    scores double precision[];
BEGIN
    PERFORM imsrc._check_k(k);
    v := imsrc._image_vector(image, m.id, m.name);
    SELECT array_agg(s.image_id ORDER BY s.rank), array_agg(s.score ORDER BY s.rank) INTO ids, scores
      FROM imsrc._search(m.id, m.dimension, v, k, categories, NULL, mode, include_duplicates, image) s;
    RETURN QUERY SELECT * FROM imsrc._duplicates_first(m.id, v, image, k, NULL, include_duplicates, ids, scores);
END
$$;

CREATE OR REPLACE FUNCTION imsrc.similar_in(image bigint, category_ids bigint[], k int DEFAULT 10,
                                            mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                            include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
    v vector;
    ids bigint[];
    scores double precision[];
    chosen bigint[] := ARRAY(SELECT DISTINCT c FROM unnest(category_ids) c ORDER BY c);
BEGIN
    PERFORM imsrc._check_k(k);
    v := imsrc._image_vector(image, m.id, m.name);
    SELECT array_agg(s.image_id ORDER BY s.rank), array_agg(s.score ORDER BY s.rank) INTO ids, scores
      FROM imsrc._search(m.id, m.dimension, v, k, NULL, coalesce(category_ids, '{}'), mode, include_duplicates,
                         image) s;
    RETURN QUERY SELECT * FROM imsrc._duplicates_first(m.id, v, image, k, chosen, include_duplicates, ids, scores);
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
    END IF;
END
$$;
"""

# 0005's bodies, restored on downgrade.
DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION imsrc.similar(image bigint, k int DEFAULT 10, categories int DEFAULT NULL,
                                         mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                         include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
    v vector;
BEGIN
    PERFORM imsrc._check_k(k);
    v := imsrc._image_vector(image, m.id, m.name);
    RETURN QUERY SELECT * FROM imsrc._search(m.id, m.dimension, v, k, categories, NULL, mode,
                                             include_duplicates, image);
END
$$;

CREATE OR REPLACE FUNCTION imsrc.similar_in(image bigint, category_ids bigint[], k int DEFAULT 10,
                                            mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                            include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
    v vector;
BEGIN
    PERFORM imsrc._check_k(k);
    v := imsrc._image_vector(image, m.id, m.name);
    RETURN QUERY SELECT * FROM imsrc._search(m.id, m.dimension, v, k, NULL, coalesce(category_ids, '{}'), mode,
                                             include_duplicates, image);
END
$$;

DROP FUNCTION IF EXISTS imsrc._duplicates_first(int, vector, bigint, int, bigint[], boolean, bigint[],
                                                double precision[]);
DROP FUNCTION IF EXISTS imsrc._band_values(int, int);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
