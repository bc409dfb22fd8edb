"""Captions: a stored tsvector column, so ranking reads it instead of parsing every matching caption again.

Revision ID: 0011_caption_tsvector
Revises: 0010_citus
Create Date: 2026-12-07 08:00

Why: 0009 indexed the expression to_tsvector('english', coalesce(caption, '')). The GIN index finds the matching
rows, but ts_rank_cd (keywords alone) and the keyword_match flag need the tsvector itself, which an expression
index does not hand back: PostgreSQL parsed each matching caption again. bench/search/keywords_bench.py at 100k
captions, a word in 1 caption of 10: keywords alone p50 162 ms (service) / 168 ms (SQL) on the loaded shared
machine. A stored generated column holds the parsed form; the GIN index moves onto it and the helpers read it
(same results: the same expression, computed once at write time).
images gets one column, caption_tsv (tsvector, generated, never written by imsrc).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011_caption_tsvector"
down_revision: str | None = "0010_citus"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The helpers of 0009 with the caption's tsvector as a parameter: the column (upgrade) or 0009's expression.
FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION imsrc._keyword_rank(p_query tsquery, p_k int, p_categories bigint[],
                                               p_include_duplicates boolean)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE sql STABLE AS $$
    SELECT i.id, ts_rank_cd({tsv}, p_query)::double precision
      FROM images i
     WHERE {tsv} @@ p_query AND i.caption IS NOT NULL
       AND (p_include_duplicates OR i.canonical_id IS NULL)
       AND (p_categories IS NULL OR i.category_id = ANY(p_categories))
     ORDER BY 2 DESC, 1
     LIMIT p_k
$$;

CREATE OR REPLACE FUNCTION imsrc._keyword_hits(p_model_id int, p_vector vector, p_query tsquery, p_k int,
                                    p_categories bigint[], p_include_duplicates boolean, p_exclude bigint)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE sql STABLE AS $$
    SELECT i.id, 1 - (e.embedding <=> p_vector)
      FROM images i JOIN embeddings e ON e.image_id = i.id AND e.model_id = p_model_id
     WHERE {tsv} @@ p_query AND i.caption IS NOT NULL
       AND (p_include_duplicates OR i.canonical_id IS NULL)
       AND (p_categories IS NULL OR i.category_id = ANY(p_categories))
       AND i.id IS DISTINCT FROM p_exclude
     ORDER BY 2 DESC, 1
     LIMIT p_k
$$;

CREATE OR REPLACE FUNCTION imsrc._boosted(p_ids bigint[], p_scores double precision[], p_query tsquery,
                                          p_boost double precision,
                               p_k int)
RETURNS TABLE (image_id bigint, score double precision, keyword_match boolean)
LANGUAGE sql STABLE AS $$
    WITH c AS (
        SELECT DISTINCT ON (u.id) u.id, u.s FROM unnest(p_ids, p_scores) u(id, s) ORDER BY u.id
    ), m AS (
        SELECT c.id, c.s, (i.caption IS NOT NULL
                           AND {tsv} @@ p_query) AS hit
          FROM c JOIN images i ON i.id = c.id
    )
    SELECT m.id, m.s, m.hit FROM m
     ORDER BY round(m.s::numeric, 6)::double precision + CASE WHEN m.hit THEN p_boost ELSE 0 END DESC, m.id
     LIMIT p_k
$$;

CREATE OR REPLACE FUNCTION imsrc.search_text(keywords text, k int DEFAULT 10, query vector DEFAULT NULL,
                                  keyword_mode text DEFAULT 'filter', boost double precision DEFAULT 0.1,
                                  categories int DEFAULT NULL, category_ids bigint[] DEFAULT NULL,
                                  mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                  include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int, caption text,
               keyword_match boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q tsquery := imsrc._keywords(keywords);
    m record;
    chosen bigint[];
    ids bigint[];
    scores double precision[];
    vids bigint[];
    vscores double precision[];
BEGIN
    PERFORM imsrc._check_k(k);
    IF keyword_mode IS NULL OR keyword_mode NOT IN ('filter', 'boost') THEN
        RAISE EXCEPTION 'imsrc: keyword_mode must be filter or boost, not %',
            coalesce(quote_literal(keyword_mode), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF boost IS NULL OR NOT (boost BETWEEN 0 AND 1) THEN
        RAISE EXCEPTION 'imsrc: boost must be between 0 and 1, not %', coalesce(boost::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF category_ids IS NOT NULL THEN
        chosen := ARRAY(SELECT DISTINCT c FROM unnest(category_ids) c ORDER BY c);
    END IF;
    IF query IS NULL THEN  -- keywords alone: no model needed
        SELECT array_agg(r.image_id ORDER BY r.score DESC, r.image_id),
               array_agg(r.score ORDER BY r.score DESC, r.image_id)
          INTO ids, scores FROM imsrc._keyword_rank(q, k, chosen, include_duplicates) r;
    ELSE
        m := imsrc._model(model);
        PERFORM imsrc._check_query(query, m.dimension, m.name);
        SELECT array_agg(h.image_id ORDER BY h.score DESC, h.image_id),
               array_agg(h.score ORDER BY h.score DESC, h.image_id)
          INTO ids, scores FROM imsrc._keyword_hits(m.id, query, q, k, chosen, include_duplicates, NULL) h;
        IF keyword_mode = 'boost' THEN
            SELECT array_agg(s.image_id ORDER BY s.rank), array_agg(s.score ORDER BY s.rank) INTO vids, vscores
              FROM imsrc._search(m.id, m.dimension, query, k, categories, chosen, mode, include_duplicates, NULL) s;
            SELECT array_agg(b.image_id ORDER BY b.o), array_agg(b.score ORDER BY b.o) INTO ids, scores
              FROM (SELECT x.image_id, x.score, row_number() OVER () AS o
                      FROM imsrc._boosted(coalesce(ids, '{{}}') || coalesce(vids, '{{}}'),
                                          coalesce(scores, '{{}}') || coalesce(vscores, '{{}}'), q, boost, k) x) b;
        END IF;
    END IF;
    RETURN QUERY
        SELECT u.id, u.s, c.name, u.o::int, i.caption,
               (i.caption IS NOT NULL AND {tsv} @@ q)
          FROM unnest(ids, scores) WITH ORDINALITY u(id, s, o)
          JOIN images i ON i.id = u.id LEFT JOIN categories c ON c.id = i.category_id
         ORDER BY u.o;
END
$$;
"""

STORED = "i.caption_tsv"
EXPRESSION = "to_tsvector('english'::regconfig, coalesce(i.caption, ''))"


def upgrade() -> None:
    op.execute("ALTER TABLE images ADD COLUMN caption_tsv tsvector "
               "GENERATED ALWAYS AS (to_tsvector('english'::regconfig, coalesce(caption, ''))) STORED")
    op.execute("CREATE INDEX ix_images_caption_tsv ON images USING gin (caption_tsv)")
    op.execute("DROP INDEX IF EXISTS ix_images_caption_fts")
    op.execute(FUNCTIONS.format(tsv=STORED))


def downgrade() -> None:
    op.execute(FUNCTIONS.format(tsv=EXPRESSION))
    op.execute("CREATE INDEX ix_images_caption_fts ON images USING gin "
               "(to_tsvector('english'::regconfig, coalesce(caption, '')))")
    op.execute("DROP INDEX IF EXISTS ix_images_caption_tsv")
    op.execute("ALTER TABLE images DROP COLUMN caption_tsv")
