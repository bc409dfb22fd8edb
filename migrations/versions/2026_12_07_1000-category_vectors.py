"""Per-category HNSW indexes on a LIST-partitioned copy of the vectors, so building one costs O(its rows).

Revision ID: 0013_category_vectors
Revises: 0012_stage1_calibrated
Create Date: 2026-12-07 10:00

Why: a per-category index used to be a partial index on `embeddings` (WHERE model_id = m AND category_id = c),
and PostgreSQL builds any index, partial or not, by reading the whole table: 100 categories at 100k rows took
5.6x the one per-model HNSW build, and each new category re-read every vector (bench/search/build_bench.py,
BENCHMARKS.md "Index builds"). Now the vectors of each category that has an index are also held, at half
precision (what the index stores anyway), in that category's partition of `category_vectors`
(PARTITION BY LIST (category_id)); its index is built on the partition, reading only that category's rows.

Why a partitioned copy rather than partitioning `embeddings` itself: PostgreSQL has no index across partitions,
so the per-model HNSW graph over the whole catalog (mode `ann`, imsrc.search without a category, imsrc.similar's
fallback) would become one walk per partition merged; the primary key (model_id, image_id) would have to take
in a category that is NULL for uncategorised images; look-ups by image id would probe every partition; and the
migration would rewrite the whole table. The copy is derived data kept by triggers in the writer's
transaction, like an index: `embeddings` stays the one source of truth, with the same shape, keys and triggers.

- A partition exists only for categories that have had a per-category index (search sync creates it, with the
  index, when a category reaches IMSRC_SEARCH_EXACT_MAX_ROWS vectors: NeighbourRepository.create_category_index;
  it stays when the index is dropped, because dropping a partition locks the whole parent); rows of other
  categories and uncategorised rows are not copied. A partition holds every model's vectors of its
  category; each model's index on it is partial on model_id.
- One statement trigger on embeddings (insert, update, delete) keeps the partitions equal to embeddings: an
  image re-categorised, a category deleted or regrouped moves its rows as the images -> embeddings trigger
  updates embeddings.category_id.
- Stage 2 walks the partition's index and re-sorts the few rows found by the full-precision vectors from
  embeddings (imsrc._neighbours here, pg_queries.NeighbourRepository.per_category).
- Index names stay ix_embeddings_hv_m<model>_c<category>; imsrc._category_indexes finds them on the partitions.
- On a Citus coordinator this revision does nothing: embeddings is already split by category into shards there,
  and a per-category index is built on its shard.

Existing catalogs: every per-category partial index on embeddings is replaced by a partition (filled from
embeddings) and the same index on it; the vectors in embeddings are not touched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op
from sqlalchemy import text

revision: str = "0013_category_vectors"
down_revision: str | None = "0012_stage1_calibrated"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HNSW_M = 32  # search.pg_queries.HNSW_M / HNSW_EF_CONSTRUCTION when this revision was written
HNSW_EF_CONSTRUCTION = 80
TOAST_TARGET_MAX = 8160  # as 0004: half-precision vectors of up to 4,000 dimensions stay in the row

TABLE = f"""
CREATE TABLE category_vectors (
    model_id integer NOT NULL,
    image_id bigint NOT NULL,
    category_id bigint NOT NULL,
    embedding halfvec NOT NULL
) PARTITION BY LIST (category_id);
COMMENT ON TABLE category_vectors IS
    'Half-precision copies of the vectors of each category that has a per-category HNSW index, one partition '
    'per category (category_vectors_c<id>), kept equal to embeddings by a trigger: the indexes are built on '
    'the partitions. Read embeddings for vectors; see db/README.md';

-- Whether a category has a partition (search sync creates it with its first index). Not MVCC: a partition
-- attached by another transaction counts once it is committed, which is when its rows are complete.
CREATE FUNCTION imsrc._category_partition(p_category_id bigint) RETURNS regclass
LANGUAGE sql STABLE AS $$
    SELECT to_regclass(format('public.category_vectors_c%s', p_category_id))
$$;

-- embeddings changed: the same rows out of / into the partitions of their categories (those that have one).
CREATE FUNCTION imsrc_category_vectors_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    c bigint;
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        FOR c IN SELECT DISTINCT o.category_id FROM old_rows o
                  WHERE o.category_id IS NOT NULL AND imsrc._category_partition(o.category_id) IS NOT NULL LOOP
            EXECUTE format('DELETE FROM public.category_vectors_c%s v USING old_rows o WHERE o.category_id = %s'
                           ' AND v.model_id = o.model_id AND v.image_id = o.image_id', c, c);
        END LOOP;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO public.category_vectors (model_id, image_id, category_id, embedding)
        SELECT n.model_id, n.image_id, n.category_id, CAST(n.embedding AS halfvec) FROM new_rows n
         WHERE n.category_id IS NOT NULL AND imsrc._category_partition(n.category_id) IS NOT NULL
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER trg_embeddings_category_vectors_insert AFTER INSERT ON embeddings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION imsrc_category_vectors_sync();
CREATE TRIGGER trg_embeddings_category_vectors_update AFTER UPDATE ON embeddings
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION imsrc_category_vectors_sync();
CREATE TRIGGER trg_embeddings_category_vectors_delete AFTER DELETE ON embeddings
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION imsrc_category_vectors_sync();

-- A category's partition, filled from embeddings (NeighbourRepository.create_category_index does the same).
-- SHARE on embeddings: no writer between the copy and the attach (its rows would miss the partition), as the
-- CREATE INDEX on embeddings that this replaces held it; ATTACH takes SHARE UPDATE EXCLUSIVE on the parent only.
CREATE FUNCTION imsrc._create_category_partition(p_category_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('category_vectors_c%s', p_category_id);
BEGIN
    IF imsrc._category_partition(p_category_id) IS NOT NULL THEN
        RETURN;
    END IF;
    LOCK TABLE public.embeddings IN SHARE MODE;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.category_vectors)', part);
    EXECUTE format('ALTER TABLE public.%I ALTER COLUMN embedding SET STORAGE MAIN,'
                   ' SET (toast_tuple_target = {TOAST_TARGET_MAX})', part);
    EXECUTE format('INSERT INTO public.%I (model_id, image_id, category_id, embedding)'
                   ' SELECT model_id, image_id, category_id, CAST(embedding AS halfvec) FROM public.embeddings'
                   ' WHERE model_id = ANY (ARRAY(SELECT id FROM public.embedding_models)) AND category_id = %s',
                   part, p_category_id);
    -- Each partition's own unique index, not one declared on the parent: pg_restore --clean cannot drop a
    -- partition's share of a parent's constraint or index (it tried, and failed `imsrc restore --force`).
    EXECUTE format('CREATE UNIQUE INDEX %I ON public.%I (model_id, image_id)', 'uq_' || part, part);
    EXECUTE format('ALTER TABLE public.category_vectors ATTACH PARTITION public.%I FOR VALUES IN (%s)',
                   part, p_category_id);
END $$;
"""

# imsrc._category_indexes and imsrc._neighbours as 0005 wrote them, with two changes: indexes are also found
# on category_vectors' partitions, and a walked branch reads the partition (then the full vectors).
OLD_INDEX_TABLE = "     WHERE x.indrelid = 'public.embeddings'::regclass\n"
NEW_INDEX_TABLE = (
    "     WHERE (x.indrelid = 'public.embeddings'::regclass OR x.indrelid IN (\n"
    "            SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass('public.category_vectors')))\n"
)
OLD_BRANCH = """    SELECT array_agg(format(
               '(SELECT image_id, %1$s AS e FROM embeddings WHERE model_id = %2$s AND category_id = %3$s'
               ' ORDER BY %4$s LIMIT %5$s)', e, p_model_id, category_id,
               CASE WHEN walk THEN format('(embedding::halfvec(%s)) <#> %s', p_dimension, h)
                    ELSE format('(%s <=> %s) + 0', e, q) END, p_limit)),"""
NEW_BRANCH = """    SELECT array_agg(CASE WHEN walk AND imsrc._category_partition(category_id) IS NOT NULL THEN format(
               '(SELECT image_id, %1$s AS e FROM (SELECT image_id FROM category_vectors WHERE model_id = %2$s'
               ' AND category_id = %3$s ORDER BY (embedding::halfvec(%4$s)) <#> %5$s LIMIT %6$s) v'
               ' JOIN embeddings USING (image_id) WHERE embeddings.model_id = %2$s)',
               e, p_model_id, category_id, p_dimension, h, p_limit)
           ELSE format(
               '(SELECT image_id, %1$s AS e FROM embeddings WHERE model_id = %2$s AND category_id = %3$s'
               ' ORDER BY %4$s LIMIT %5$s)', e, p_model_id, category_id,
               CASE WHEN walk THEN format('(embedding::halfvec(%s)) <#> %s', p_dimension, h)
                    ELSE format('(%s <=> %s) + 0', e, q) END, p_limit) END),"""


def _functions_0005() -> str:
    spec = importlib.util.spec_from_file_location("m0005", Path(__file__).with_name("2026_12_02_0200-sql_search.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.FUNCTIONS)


def _block(sql: str, head: str) -> str:
    start = sql.index(head)
    end = sql.index("\n$$;\n", start) + len("\n$$;\n")
    return sql[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _search_functions(partitions: bool) -> str:
    sql = _functions_0005()
    indexes = _block(sql, "CREATE FUNCTION imsrc._category_indexes(")
    neighbours = _block(sql, "CREATE FUNCTION imsrc._neighbours(")
    if partitions:
        assert OLD_INDEX_TABLE in indexes and OLD_BRANCH in neighbours
        indexes = indexes.replace(OLD_INDEX_TABLE, NEW_INDEX_TABLE)
        neighbours = neighbours.replace(OLD_BRANCH, NEW_BRANCH)
    return indexes + neighbours


def _citus(conn: object) -> bool:
    """embeddings is a Citus distributed table (0010_citus ran on a coordinator)."""
    if not conn.execute(text("SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL")).scalar():  # type: ignore[attr-defined]
        return False
    return bool(
        conn.execute(  # type: ignore[attr-defined]
            text("SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'public.embeddings'::regclass)")
        ).scalar()
    )


GRANTS = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
        EXECUTE 'GRANT SELECT ON category_vectors TO imsrc_reader';
        -- DDL, for search sync only (the reader could not create the table anyway)
        EXECUTE 'REVOKE EXECUTE ON FUNCTION imsrc._create_category_partition(bigint) FROM imsrc_reader, PUBLIC';
    END IF;
END
$$;
"""


def upgrade() -> None:
    conn = op.get_bind()
    if _citus(conn):
        return
    op.execute(TABLE)
    # Existing per-category indexes: the same index, on a partition filled from embeddings.
    indexes = conn.execute(
        text(
            "SELECT c.relname, substring(c.relname FROM '^ix_embeddings_hv_m([0-9]+)_c[0-9]+$')::int,"
            " substring(c.relname FROM '^ix_embeddings_hv_m[0-9]+_c([0-9]+)$')::bigint"
            " FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid"
            " WHERE x.indrelid = 'public.embeddings'::regclass AND c.relname ~ '^ix_embeddings_hv_m[0-9]+_c[0-9]+$'"
        )
    ).all()
    for name, model_id, category_id in indexes:
        dimension = conn.execute(text("SELECT dimension FROM embedding_models WHERE id = :m"), {"m": model_id}).scalar()
        op.execute(f"SELECT imsrc._create_category_partition({int(category_id)})")
        op.execute(f"DROP INDEX {name}")
        if dimension is None:
            continue
        op.execute(
            f"CREATE INDEX {name} ON category_vectors_c{int(category_id)} USING hnsw "
            f"((embedding::halfvec({int(dimension)})) halfvec_ip_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) WHERE model_id = {int(model_id)}"
        )
    op.execute(_search_functions(partitions=True))
    op.execute(GRANTS)


def downgrade() -> None:
    conn = op.get_bind()
    if _citus(conn):
        return
    indexes = conn.execute(
        text(
            "SELECT c.relname, substring(c.relname FROM '^ix_embeddings_hv_m([0-9]+)_c[0-9]+$')::int,"
            " substring(c.relname FROM '^ix_embeddings_hv_m[0-9]+_c([0-9]+)$')::bigint, m.dimension"
            " FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid"
            " JOIN pg_inherits i ON i.inhrelid = x.indrelid AND i.inhparent = 'public.category_vectors'::regclass"
            " JOIN embedding_models m ON m.id = substring(c.relname FROM '^ix_embeddings_hv_m([0-9]+)_c')::int"
            " WHERE c.relname ~ '^ix_embeddings_hv_m[0-9]+_c[0-9]+$'"
        )
    ).all()
    op.execute(_search_functions(partitions=False))
    op.execute(
        """
        DROP TRIGGER trg_embeddings_category_vectors_insert ON embeddings;
        DROP TRIGGER trg_embeddings_category_vectors_update ON embeddings;
        DROP TRIGGER trg_embeddings_category_vectors_delete ON embeddings;
        DROP FUNCTION imsrc_category_vectors_sync();
        DROP FUNCTION imsrc._create_category_partition(bigint);
        DROP TABLE category_vectors;
        DROP FUNCTION imsrc._category_partition(bigint);
        """
    )
    for name, model_id, category_id, dimension in indexes:
        op.execute(
            f"CREATE INDEX {name} ON embeddings USING hnsw ((embedding::halfvec({int(dimension)})) halfvec_ip_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) "
            f"WHERE model_id = {int(model_id)} AND category_id = {int(category_id)}"
        )
