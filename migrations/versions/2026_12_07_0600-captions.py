"""Captions: a length limit, a full-text index, and keyword / hybrid search in SQL (imsrc.search_text).

Revision ID: 0009_captions
Revises: 0008_region_embeddings
Create Date: 2026-12-07 06:00

images.caption exists since the first schema; nothing wrote it. Now four routes do (upload form, sidecar files
at index time, `imsrc captions import`, PATCH /api/images/{id}), so it gets:
- a CHECK on its length (2000 characters, catalog/captions.py MAX_CAPTION_CHARS): the service refuses longer
  ones with a 4xx, and the table refuses them from any other writer too;
- a GIN index on to_tsvector('english', coalesce(caption, '')). English stems ("boats" finds "boat") and drops
  stop words. Queries must use this exact expression to take the index: the helpers below do.

Keyword search helpers, shared by the service (search/keywords.py calls them) and imsrc.search_text, so the
API and SQL rank the same way by construction:
- _keywords(text): websearch_to_tsquery (quotes, OR, -word; never a syntax error), RAISE when nothing is left;
- _keyword_rank: keywords alone, ranked by ts_rank_cd, then id;
- _keyword_hits: keywords filter, vectors rank (exact cosine over the matching images: a keyword filter keeps
  few rows, and an ANN walk with a post-filter would miss them, see design.md);
- _boosted: vectors rank, keywords boost: candidates (the vector search's hits and the best keyword hits),
  ordered by cosine (rounded to 6 digits, as the API reports it) + boost when the caption matches, then id.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009_captions"
down_revision: str | None = "0008_region_embeddings"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE images ADD CONSTRAINT ck_images_caption_length
    CHECK (caption IS NULL OR char_length(caption) <= 2000);
CREATE INDEX ix_images_caption_fts ON images USING gin (to_tsvector('english'::regconfig, coalesce(caption, '')));

CREATE FUNCTION imsrc._keywords(p_keywords text) RETURNS tsquery
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    q tsquery;
BEGIN
    IF p_keywords IS NULL OR btrim(p_keywords) = '' THEN
        RAISE EXCEPTION 'imsrc: the keywords are empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF char_length(p_keywords) > 1000 THEN
        RAISE EXCEPTION 'imsrc: keywords must be at most 1000 characters, not %', char_length(p_keywords)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    q := websearch_to_tsquery('english'::regconfig, p_keywords);
    IF numnode(q) = 0 THEN
        RAISE EXCEPTION 'imsrc: the keywords % have no searchable words (only stop words or punctuation)',
            quote_literal(p_keywords) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN q;
END
$$;

CREATE FUNCTION imsrc._keyword_rank(p_query tsquery, p_k int, p_categories bigint[], p_include_duplicates boolean)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE sql STABLE AS $$
    SELECT i.id, ts_rank_cd(to_tsvector('english'::regconfig, coalesce(i.caption, '')), p_query)::double precision
      FROM images i
     WHERE to_tsvector('english'::regconfig, coalesce(i.caption, '')) @@ p_query AND i.caption IS NOT NULL
       AND (p_include_duplicates OR i.canonical_id IS NULL)
       AND (p_categories IS NULL OR i.category_id = ANY(p_categories))
     ORDER BY 2 DESC, 1
     LIMIT p_k
$$;

CREATE FUNCTION imsrc._keyword_hits(p_model_id int, p_vector vector, p_query tsquery, p_k int,
                                    p_categories bigint[], p_include_duplicates boolean, p_exclude bigint)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE sql STABLE AS $$
    SELECT i.id, 1 - (e.embedding <=> p_vector)
      FROM images i JOIN embeddings e ON e.image_id = i.id AND e.model_id = p_model_id
     WHERE to_tsvector('english'::regconfig, coalesce(i.caption, '')) @@ p_query AND i.caption IS NOT NULL
       AND (p_include_duplicates OR i.canonical_id IS NULL)
       AND (p_categories IS NULL OR i.category_id = ANY(p_categories))
       AND i.id IS DISTINCT FROM p_exclude
     ORDER BY 2 DESC, 1
     LIMIT p_k
$$;

CREATE FUNCTION imsrc._boosted(p_ids bigint[], p_scores double precision[], p_query tsquery, p_boost double precision,
                               p_k int)
RETURNS TABLE (image_id bigint, score double precision, keyword_match boolean)
LANGUAGE sql STABLE AS $$
    WITH c AS (
        SELECT DISTINCT ON (u.id) u.id, u.s FROM unnest(p_ids, p_scores) u(id, s) ORDER BY u.id
    ), m AS (
        SELECT c.id, c.s, (i.caption IS NOT NULL
                           AND to_tsvector('english'::regconfig, coalesce(i.caption, '')) @@ p_query) AS hit
          FROM c JOIN images i ON i.id = c.id
    )
    SELECT m.id, m.s, m.hit FROM m
     ORDER BY round(m.s::numeric, 6)::double precision + CASE WHEN m.hit THEN p_boost ELSE 0 END DESC, m.id
     LIMIT p_k
$$;

CREATE FUNCTION imsrc.search_text(keywords text, k int DEFAULT 10, query vector DEFAULT NULL,
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
                      FROM imsrc._boosted(coalesce(ids, '{}') || coalesce(vids, '{}'),
                                          coalesce(scores, '{}') || coalesce(vscores, '{}'), q, boost, k) x) b;
        END IF;
    END IF;
    RETURN QUERY
        SELECT u.id, u.s, c.name, u.o::int, i.caption,
               (i.caption IS NOT NULL AND to_tsvector('english'::regconfig, coalesce(i.caption, '')) @@ q)
          FROM unnest(ids, scores) WITH ORDINALITY u(id, s, o)
          JOIN images i ON i.id = u.id LEFT JOIN categories c ON c.id = i.category_id
         ORDER BY u.o;
END
$$;
COMMENT ON FUNCTION imsrc.search_text(text, int, vector, text, double precision, int, bigint[], text, text, boolean)
    IS 'Keyword search over captions (websearch syntax, English stemming): alone (ranked by ts_rank_cd), or with '
       'a query vector: keyword_mode filter (matching images ranked by cosine) or boost (the two-stage search''s '
       'hits and the best matches, ranked by cosine + boost where the caption matches). '
       '(image_id, score, category, rank, caption, keyword_match)';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
    END IF;
END
$$;
"""

DOWNGRADE = r"""
DROP FUNCTION IF EXISTS imsrc.search_text(text, int, vector, text, double precision, int, bigint[], text, text,
                                          boolean);
DROP FUNCTION IF EXISTS imsrc._boosted(bigint[], double precision[], tsquery, double precision, int);
DROP FUNCTION IF EXISTS imsrc._keyword_hits(int, vector, tsquery, int, bigint[], boolean, bigint);
DROP FUNCTION IF EXISTS imsrc._keyword_rank(tsquery, int, bigint[], boolean);
DROP FUNCTION IF EXISTS imsrc._keywords(text);
DROP INDEX IF EXISTS ix_images_caption_fts;
ALTER TABLE images DROP CONSTRAINT IF EXISTS ck_images_caption_length;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
