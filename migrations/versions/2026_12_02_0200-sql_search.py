"""Two-stage search inside the database: schema `imsrc` with search functions, and views for prototypes and
per-category indexes.

Revision ID: 0005_sql_search
Revises: 0004_embeddings_uncompressed
Create Date: 2026-12-02 02:00

Why: SQL users could read the catalog but not search it the way the service does; a hand-written
`ORDER BY embedding <=> q` is a single-stage scan, and the per-category partial indexes on
`embedding::halfvec(d)` are only used by a query written exactly like the service's. These functions are
PL/pgSQL ports of the pgvector path of backend/imsrc/search (service.py, stage1.py, pg_queries.py): the same
stage-1 rule (softmax score mass up to a cap), the same branch plan and ef policy, the same duplicate
handling and the same fill from the next categories. Keep them in step when that code changes
(tests/test_sql_search.py compares them with the API).

The service's settings live in its environment, which the database cannot see; the functions read custom
settings with the service's defaults instead (`imsrc.ef_search` 100, `imsrc.score_mass` 0.9,
`imsrc.categories` 3, `imsrc.two_stage_min_rows` 20000); see db/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_sql_search"
down_revision: str | None = "0004_embeddings_uncompressed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
CREATE SCHEMA imsrc;
COMMENT ON SCHEMA imsrc IS 'imsrc search functions (two-stage search as the service does it with pgvector)';

-- A search setting: a custom GUC imsrc.<name> (SET / ALTER DATABASE ... SET), else the service's default.
CREATE FUNCTION imsrc._setting(name text, fallback numeric) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('imsrc.' || name, true), '')::numeric, fallback)
$$;

-- The model to search: the active one, or one by name; a clear error otherwise.
CREATE FUNCTION imsrc._model(p_model text, OUT id int, OUT dimension int, OUT name text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_model IS NULL THEN
        SELECT m.id, m.dimension, m.name INTO id, dimension, name FROM embedding_models m WHERE m.is_active;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'imsrc: no embedding model is active yet: index some images first (imsrc index PATH)'
                USING ERRCODE = 'no_data_found';
        END IF;
    ELSE
        SELECT m.id, m.dimension, m.name INTO id, dimension, name FROM embedding_models m WHERE m.name = p_model;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'imsrc: unknown model %', quote_literal(p_model)
                USING ERRCODE = 'invalid_parameter_value', HINT = 'SELECT name FROM catalog_models';
        END IF;
    END IF;
END
$$;

CREATE FUNCTION imsrc._check_query(p_query vector, p_dimension int, p_model text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_query IS NULL THEN
        RAISE EXCEPTION 'imsrc: the query vector is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF vector_dims(p_query) <> p_dimension THEN
        RAISE EXCEPTION 'imsrc: the query vector has % dimensions, model % has %',
            vector_dims(p_query), p_model, p_dimension USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE FUNCTION imsrc._check_k(p_k int, p_what text DEFAULT 'k') RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'imsrc: % must be between 1 and 1000, not %', p_what, coalesce(p_k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Stage 1 (stage1.PrototypeMatrix.score): every category with mean/cluster prototypes, scored by its best
-- prototype (inner product of unit vectors = cosine), best first, ties by category id.
CREATE FUNCTION imsrc._ranked(p_model_id int, p_query vector)
RETURNS TABLE (category_id bigint, category text, score double precision)
LANGUAGE sql STABLE AS $$
    SELECT p.category_id, c.name, max(-(p.vector <#> p_query)) AS score
      FROM category_prototypes p JOIN categories c ON c.id = p.category_id
     WHERE p.model_id = p_model_id AND p.kind IN ('mean', 'cluster')
     GROUP BY p.category_id, c.name
     ORDER BY score DESC, p.category_id
$$;

-- stage1.pick: how many of the ranked categories to search. p_requested NULL: the score-mass rule up to the
-- cap (imsrc.categories); 0: the score-mass rule alone ('auto'); n > 0: exactly n.
CREATE FUNCTION imsrc._pick_count(p_scores double precision[], p_requested int) RETURNS int
LANGUAGE plpgsql STABLE AS $$
DECLARE
    total int := coalesce(cardinality(p_scores), 0);
    mass double precision := imsrc._setting('score_mass', 0.9);
    cap int := CASE WHEN p_requested = 0 THEN total ELSE imsrc._setting('categories', 3)::int END;
    n int;
BEGIN
    IF total = 0 THEN
        RETURN 0;
    END IF;
    IF p_requested > 0 THEN
        RETURN least(p_requested, total);
    END IF;
    -- Softmax with temperature 0.05; n = the first position where the cumulative weight reaches the mass.
    WITH w AS (
        SELECT o, exp((s - p_scores[1]) / 0.05) AS w FROM unnest(p_scores) WITH ORDINALITY u(s, o)
    ), c AS (
        SELECT o, sum(w) OVER (ORDER BY o) / sum(w) OVER () AS cum FROM w
    )
    SELECT count(*) + 1 INTO n FROM c WHERE cum < mass - 1e-12;
    RETURN greatest(1, least(n, total, coalesce(nullif(cap, 0), total)));
END
$$;

-- Categories of a model that have a per-category HNSW index, with the rows it held when last built/analysed
-- (pg_queries.NeighbourRepository.category_indexes).
CREATE FUNCTION imsrc._category_indexes(p_model_id int)
RETURNS TABLE (category_id bigint, index_rows bigint)
LANGUAGE sql STABLE AS $$
    SELECT substring(c.relname FROM '^ix_embeddings_hv_m[0-9]+_c([0-9]+)$')::bigint,
           greatest(trunc(c.reltuples)::bigint, 0)
      FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
     WHERE x.indrelid = 'public.embeddings'::regclass
       AND c.relname ~ ('^ix_embeddings_hv_m' || p_model_id || '_c[0-9]+$')
$$;

-- One HNSW statement with the settings the service gives it (pg_queries.walk_settings plus enable_sort and
-- enable_seqscan off, so each branch takes its index). The SET clauses restore the caller's values on exit.
CREATE FUNCTION imsrc._walk(p_sql text, p_query vector, p_ef int, p_limit int)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE plpgsql STABLE
SET enable_sort = off SET enable_seqscan = off
SET hnsw.iterative_scan = relaxed_order SET hnsw.ef_search = 40 AS $$
BEGIN
    PERFORM set_config('hnsw.ef_search', least(1000, greatest(p_ef, p_limit))::text, true);
    RETURN QUERY EXECUTE p_sql USING p_query;
END
$$;

-- The query's vector type in stage 2 (catalog.repository.embedding_expr): vector(d) up to 2,000
-- dimensions, halfvec(d) above (what the per-model HNSW index is built on).
CREATE FUNCTION imsrc._expr(p_dimension int) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_dimension <= 2000 THEN format('vector(%s)', p_dimension)
                ELSE format('halfvec(%s)', p_dimension) END
$$;

-- One stage-2 round (service._neighbours): `p_limit` nearest rows, duplicates not yet removed.
CREATE FUNCTION imsrc._neighbours(p_model_id int, p_dimension int, p_query vector, p_limit int,
                                  p_chosen bigint[], p_near bigint[], p_mode text)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t text := imsrc._expr(p_dimension);
    e text := format('(embedding::%s)', t);
    q text := format('$1::%s', t);
    h text := format('$1::halfvec(%s)', p_dimension);
    base int := imsrc._setting('ef_search', 100)::int;
    ef int;
    branches text[];
    any_indexed boolean;
    found_rows int;
    in_chosen bigint;
    sql text;
    ids bigint[];
    scores double precision[];
BEGIN
    IF p_mode = 'exact' THEN
        -- Full precision and `+ 0`, so no (approximate) index can take over the ordering.
        RETURN QUERY EXECUTE format(
            'SELECT image_id, 1 - (embedding <=> $1) FROM embeddings WHERE model_id = %s %s'
            ' ORDER BY (embedding <=> $1) + 0, image_id LIMIT %s',
            p_model_id, CASE WHEN p_chosen IS NULL THEN '' ELSE 'AND category_id = ANY($2)' END, p_limit)
            USING p_query, p_chosen;
        RETURN;
    END IF;
    IF p_chosen IS NULL THEN
        -- The per-model cosine HNSW index over every image (NeighbourRepository.global_ann).
        RETURN QUERY SELECT w.image_id, w.score FROM imsrc._walk(format(
            'SELECT image_id, 1 - (%1$s <=> %2$s) FROM embeddings WHERE model_id = %3$s'
            ' ORDER BY %1$s <=> %2$s LIMIT %4$s', e, q, p_model_id, p_limit), p_query, base, p_limit) w
            ORDER BY w.score DESC, w.image_id;
        RETURN;
    END IF;
    -- pg_queries.branch_plan: a category is walked through its index when it has one and the query is near
    -- it (or it is too big to scan); one ef for the statement, the widest a walked branch needs.
    WITH plan AS (
        SELECT c.id AS category_id, x.index_rows,
               x.category_id IS NOT NULL AND (c.id = ANY(p_near) OR x.index_rows >= 2000) AS walk,
               c.id = ANY(p_near) AS near
          FROM unnest(p_chosen) WITH ORDINALITY c(id, o)
          LEFT JOIN imsrc._category_indexes(p_model_id) x ON x.category_id = c.id
    )
    SELECT array_agg(format(
               '(SELECT image_id, %1$s AS e FROM embeddings WHERE model_id = %2$s AND category_id = %3$s'
               ' ORDER BY %4$s LIMIT %5$s)', e, p_model_id, category_id,
               CASE WHEN walk THEN format('(embedding::halfvec(%s)) <#> %s', p_dimension, h)
                    ELSE format('(%s <=> %s) + 0', e, q) END, p_limit)),
           coalesce(max(CASE WHEN NOT walk THEN NULL
                             WHEN near THEN least(1000, greatest(base, ceil(2 * sqrt(index_rows))::int))
                             ELSE 1000 END), base),
           bool_or(index_rows IS NOT NULL)
      INTO branches, ef, any_indexed
      FROM plan;
    sql := format('SELECT image_id, 1 - (e <=> %s) AS score FROM (%s) s ORDER BY score DESC, image_id LIMIT %s',
                  q, array_to_string(branches, ' UNION ALL '), p_limit);
    SELECT array_agg(w.image_id ORDER BY w.o), array_agg(w.score ORDER BY w.o) INTO ids, scores
      FROM imsrc._walk(sql, p_query, ef, p_limit) WITH ORDINALITY w(image_id, score, o);
    found_rows := coalesce(cardinality(ids), 0);
    IF found_rows < p_limit AND any_indexed THEN
        SELECT count(*) INTO in_chosen FROM embeddings x
         WHERE x.model_id = p_model_id AND x.category_id = ANY(p_chosen);
        IF in_chosen > found_rows THEN
            -- An HNSW graph can strand a few rows (e.g. after many deletes); k rows are promised, so
            -- answer this query exactly rather than short.
            SELECT array_agg(format(
                       '(SELECT image_id, %1$s AS e FROM embeddings WHERE model_id = %2$s AND category_id = %3$s'
                       ' ORDER BY (%1$s <=> %4$s) + 0 LIMIT %5$s)', e, p_model_id, c, q, p_limit))
              INTO branches FROM unnest(p_chosen) c;
            sql := format('SELECT image_id, 1 - (e <=> %s) AS score FROM (%s) s ORDER BY score DESC, image_id'
                          ' LIMIT %s', q, array_to_string(branches, ' UNION ALL '), p_limit);
            SELECT array_agg(w.image_id ORDER BY w.o), array_agg(w.score ORDER BY w.o) INTO ids, scores
              FROM imsrc._walk(sql, p_query, ef, p_limit) WITH ORDINALITY w(image_id, score, o);
        END IF;
    END IF;
    RETURN QUERY SELECT u.id, u.s FROM unnest(ids, scores) WITH ORDINALITY u(id, s, o) ORDER BY u.o;
END
$$;

-- Stage 2 with duplicate handling (service._stage2): ask for a margin over k, drop near-duplicates (and the
-- query image itself), and double the request while fewer than k remain.
CREATE FUNCTION imsrc._stage2(p_model_id int, p_dimension int, p_query vector, p_k int, p_chosen bigint[],
                              p_near bigint[], p_mode text, p_include_duplicates boolean, p_exclude bigint)
RETURNS TABLE (image_id bigint, score double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lim int := p_k + CASE WHEN p_include_duplicates THEN 0 ELSE greatest(5, p_k / 2) END
                   + CASE WHEN p_exclude IS NULL THEN 0 ELSE 1 END;
    ids bigint[];
    scores double precision[];
    kept int;
BEGIN
    LOOP
        SELECT array_agg(n.image_id ORDER BY n.o), array_agg(n.score ORDER BY n.o) INTO ids, scores
          FROM imsrc._neighbours(p_model_id, p_dimension, p_query, lim, p_chosen, p_near, p_mode)
               WITH ORDINALITY n(image_id, score, o);
        SELECT count(*) INTO kept FROM unnest(ids) u(id) JOIN images i ON i.id = u.id
         WHERE u.id IS DISTINCT FROM p_exclude AND (p_include_duplicates OR i.canonical_id IS NULL);
        EXIT WHEN kept >= p_k OR coalesce(cardinality(ids), 0) < lim OR lim >= 10000;
        lim := least(lim * 2, 10000);
    END LOOP;
    RETURN QUERY
        SELECT u.id, u.s FROM unnest(ids, scores) WITH ORDINALITY u(id, s, o) JOIN images i ON i.id = u.id
         WHERE u.id IS DISTINCT FROM p_exclude AND (p_include_duplicates OR i.canonical_id IS NULL)
         ORDER BY u.o LIMIT p_k;
END
$$;

-- The whole search (service.search_vector with the pgvector backend).
CREATE FUNCTION imsrc._search(p_model_id int, p_dimension int, p_query vector, p_k int, p_requested int,
                              p_category_ids bigint[], p_mode text, p_include_duplicates boolean, p_exclude bigint)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    mode text := p_mode;
    min_rows int := imsrc._setting('two_stage_min_rows', 20000)::int;
    ranked_ids bigint[];
    ranked_scores double precision[];
    total int := 0;
    n int;
    searched int;
    chosen bigint[];
    near bigint[];
    missing bigint;
    hit_ids bigint[];
    hit_scores double precision[];
BEGIN
    IF mode IS NULL OR mode NOT IN ('two_stage', 'ann', 'exact') THEN
        RAISE EXCEPTION 'imsrc: mode must be two_stage, ann or exact, not %', coalesce(quote_literal(mode), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_requested IS NOT NULL AND (p_requested < 0 OR p_requested > 1000) THEN
        RAISE EXCEPTION 'imsrc: categories must be between 1 and 1000 (0 = by score mass alone), not %',
            p_requested USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_category_ids IS NOT NULL THEN
        IF cardinality(p_category_ids) = 0 THEN
            RAISE EXCEPTION 'imsrc: the category list is empty' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c INTO missing FROM unnest(p_category_ids) c WHERE NOT EXISTS (SELECT 1 FROM categories x WHERE x.id = c)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'imsrc: no category with id %', coalesce(missing::text, 'NULL')
                USING ERRCODE = 'invalid_parameter_value', HINT = 'SELECT id, name FROM catalog_categories';
        END IF;
        chosen := ARRAY(SELECT DISTINCT c FROM unnest(p_category_ids) c ORDER BY c);
        near := chosen;
        IF mode <> 'exact' THEN
            -- Which named categories would stage 1 itself have picked? Only those are walked at normal width.
            SELECT array_agg(r.category_id), array_agg(r.score) INTO ranked_ids, ranked_scores
              FROM imsrc._ranked(p_model_id, p_query) r;
            IF ranked_ids IS NOT NULL THEN
                near := ranked_ids[1:imsrc._pick_count(ranked_scores, NULL)];
            END IF;
        END IF;
    ELSIF mode = 'two_stage' THEN
        IF p_requested IS NULL AND min_rows > 0 AND (SELECT count(*) FROM (
                SELECT 1 FROM embeddings WHERE model_id = p_model_id LIMIT min_rows) s) < min_rows THEN
            mode := 'ann';  -- small catalog: one walk of the model's graph beats stage 1 plus a walk per category
        ELSE
            SELECT array_agg(r.category_id), array_agg(r.score) INTO ranked_ids, ranked_scores
              FROM imsrc._ranked(p_model_id, p_query) r;
            total := coalesce(cardinality(ranked_ids), 0);
            IF total = 0 THEN
                mode := 'ann';  -- no prototypes yet: search everything rather than nothing
            ELSE
                searched := imsrc._pick_count(ranked_scores, p_requested);
                chosen := ranked_ids[1:searched];
                near := chosen;
            END IF;
        END IF;
    END IF;

    SELECT array_agg(s.image_id), array_agg(s.score) INTO hit_ids, hit_scores
      FROM imsrc._stage2(p_model_id, p_dimension, p_query, p_k, chosen, near, mode, p_include_duplicates,
                         p_exclude) s;
    IF mode = 'two_stage' AND p_category_ids IS NULL THEN
        -- service._fill: k results are promised; take the next categories in stage-1 order, doubling the set
        -- each round, and at the end every image (uncategorised ones too).
        WHILE coalesce(cardinality(hit_ids), 0) < p_k AND chosen IS NOT NULL LOOP
            IF searched < total THEN
                n := least(total, searched + greatest(1, searched));
                near := near || ranked_ids[searched + 1:n];
                searched := n;
                chosen := ranked_ids[1:searched];
            ELSE
                chosen := NULL;
            END IF;
            SELECT array_agg(s.image_id), array_agg(s.score) INTO hit_ids, hit_scores
              FROM imsrc._stage2(p_model_id, p_dimension, p_query, p_k, chosen, near, mode, p_include_duplicates,
                                 p_exclude) s;
        END LOOP;
    END IF;
    RETURN QUERY
        SELECT u.id, u.s, c.name, u.o::int
          FROM unnest(hit_ids, hit_scores) WITH ORDINALITY u(id, s, o)
          JOIN images i ON i.id = u.id LEFT JOIN categories c ON c.id = i.category_id
         ORDER BY u.o;
END
$$;

-- The stored vector of an indexed image; a clear error when there is none.
CREATE FUNCTION imsrc._image_vector(p_image_id bigint, p_model_id int, p_model text) RETURNS vector
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v vector;
BEGIN
    SELECT e.embedding INTO v FROM embeddings e WHERE e.model_id = p_model_id AND e.image_id = p_image_id;
    IF v IS NULL THEN
        IF NOT EXISTS (SELECT 1 FROM images i WHERE i.id = p_image_id) THEN
            RAISE EXCEPTION 'imsrc: image % does not exist', coalesce(p_image_id::text, 'NULL')
                USING ERRCODE = 'no_data_found';
        END IF;
        RAISE EXCEPTION 'imsrc: image % has no embedding for model % yet', p_image_id, p_model
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- ------------------------------------------------------------------ the public functions
CREATE FUNCTION imsrc.search(query vector, k int DEFAULT 10, categories int DEFAULT NULL,
                             mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                             include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
BEGIN
    PERFORM imsrc._check_query(query, m.dimension, m.name);
    PERFORM imsrc._check_k(k);
    RETURN QUERY SELECT * FROM imsrc._search(m.id, m.dimension, query, k, categories, NULL, mode,
                                             include_duplicates, NULL);
END
$$;
COMMENT ON FUNCTION imsrc.search(vector, int, int, text, text, boolean) IS
    'Two-stage search as the service does it with pgvector: (image_id, score = cosine similarity, category, rank)';

CREATE FUNCTION imsrc.search_in(query vector, category_ids bigint[], k int DEFAULT 10,
                                mode text DEFAULT 'two_stage', model text DEFAULT NULL,
                                include_duplicates boolean DEFAULT false)
RETURNS TABLE (image_id bigint, score double precision, category text, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
BEGIN
    PERFORM imsrc._check_query(query, m.dimension, m.name);
    PERFORM imsrc._check_k(k);
    RETURN QUERY SELECT * FROM imsrc._search(m.id, m.dimension, query, k, NULL, coalesce(category_ids, '{}'),
                                             mode, include_duplicates, NULL);
END
$$;
COMMENT ON FUNCTION imsrc.search_in(vector, bigint[], int, text, text, boolean) IS
    'Search only the given categories (ids), skipping stage 1, as ?category= does';

CREATE FUNCTION imsrc.similar(image bigint, k int DEFAULT 10, categories int DEFAULT NULL,
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
COMMENT ON FUNCTION imsrc.similar(bigint, int, int, text, text, boolean) IS
    'More like this indexed image (the image itself left out), as GET /api/search/similar/{id}';

CREATE FUNCTION imsrc.similar_in(image bigint, category_ids bigint[], k int DEFAULT 10,
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
COMMENT ON FUNCTION imsrc.similar_in(bigint, bigint[], int, text, text, boolean) IS
    'More like this indexed image within the given categories (ids)';

CREATE FUNCTION imsrc.categories_for(query vector, n int DEFAULT NULL, model text DEFAULT NULL)
RETURNS TABLE (category_id bigint, category text, score double precision, rank int)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m record := imsrc._model(model);
BEGIN
    PERFORM imsrc._check_query(query, m.dimension, m.name);
    IF n IS NOT NULL THEN
        PERFORM imsrc._check_k(n, 'n');
    END IF;
    RETURN QUERY SELECT r.category_id, r.category, r.score, r.o::int
      FROM imsrc._ranked(m.id, query) WITH ORDINALITY r(category_id, category, score, o)
     WHERE n IS NULL OR r.o <= n ORDER BY r.o;
END
$$;
COMMENT ON FUNCTION imsrc.categories_for(vector, int, text) IS
    'Stage 1 alone: every category scored by its best prototype, best first (the top n when n is given)';

CREATE FUNCTION imsrc.stage1(query vector, categories int DEFAULT NULL, model text DEFAULT NULL)
RETURNS TABLE (category_id bigint, category text, score double precision, rank int)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF categories IS NOT NULL AND (categories < 0 OR categories > 1000) THEN
        RAISE EXCEPTION 'imsrc: categories must be between 1 and 1000 (0 = by score mass alone), not %',
            categories USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY WITH r AS (SELECT * FROM imsrc.categories_for(query, NULL, model) x)
    SELECT r.* FROM r
     WHERE r.rank <= imsrc._pick_count(ARRAY(SELECT r2.score FROM r r2 ORDER BY r2.rank), stage1.categories)
     ORDER BY r.rank;
END
$$;
COMMENT ON FUNCTION imsrc.stage1(vector, int, text) IS
    'The categories a two-stage search would pick for this query (score-mass rule up to imsrc.categories)';
"""

VIEWS = r"""
CREATE VIEW catalog_prototypes AS
SELECT p.category_id, c.name AS category, m.name AS model, p.kind, p.ordinal, p.vector, p.member_count,
       p.updated_at, m.dimension, m.is_active AS active_model
  FROM category_prototypes p
  JOIN categories c ON c.id = p.category_id
  JOIN embedding_models m ON m.id = p.model_id;
COMMENT ON VIEW catalog_prototypes IS
    'Category prototypes (stage 1 of search): mean, k-means cluster and text vectors per (category, model)';

CREATE VIEW catalog_category_indexes AS
SELECT m.name AS model, m.id AS model_id, x.category_id, c.name AS category, x.index_rows,
       i.relname AS index_name, format('(embedding::halfvec(%s))', m.dimension) AS index_expression,
       format('WHERE model_id = %s AND category_id = %s', m.id, x.category_id) AS index_predicate,
       format('ORDER BY (embedding::halfvec(%1$s)) <#> CAST(q AS halfvec(%1$s))', m.dimension) AS order_by
  FROM embedding_models m
  CROSS JOIN LATERAL imsrc._category_indexes(m.id) x
  JOIN categories c ON c.id = x.category_id
  JOIN pg_class i ON i.relname = format('ix_embeddings_hv_m%s_c%s', m.id, x.category_id);
COMMENT ON VIEW catalog_category_indexes IS
    'Per-category HNSW indexes and how a hand-written query must be written to use them (see db/README.md)';
"""

GRANTS = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT USAGE ON SCHEMA imsrc TO imsrc_reader';
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
        EXECUTE 'GRANT SELECT ON catalog_prototypes, catalog_category_indexes TO imsrc_reader';
    END IF;
END
$$;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)
    op.execute(VIEWS)
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS catalog_category_indexes")
    op.execute("DROP VIEW IF EXISTS catalog_prototypes")
    op.execute("DROP SCHEMA IF EXISTS imsrc CASCADE")
