"""The SQL functions walk the model's graph over every image on halfvec, and score a category's partition from its
own half-precision row, as the service does.

Revision ID: 0018_halfvec_walks
Revises: 0017_fallback_categories
Create Date: 2026-12-07 15:00

Why: at 1M real-calibrated 1280-d vectors the catalog (22 GB) did not fit in the bench machine's 24 GB, and a fresh
query paid a page read per visited graph element or scored row from outside PostgreSQL's cache.
- The model's graph over every image (mode `ann`, ix_embeddings_hnsw_m<model>) was on full-precision vectors up to
  2,000 dimensions (7.8 GB at 1M x 1280-d); it is now on halfvec at every dimension (catalog.repository.
  embedding_expr), about half the pages. The walk orders by the graph's own expression and the score is computed
  from the row's full-precision vector. A catalog indexed before keeps its graph until `imsrc categories sync`
  rebuilds it (search.sync.rebuild_legacy_graphs, concurrently): imsrc._global_type says which one the model has,
  so the functions walk whichever exists. A downgrade rebuilds such graphs on full-precision vectors again (up to
  2,000 dimensions), in its own transaction: the code of 0017 writes only that expression.
- A category walked on its partition of category_vectors was joined to embeddings for its full-precision vectors,
  one more page per row found; it is now scored from the partition's row, read by the walk anyway (scores move by
  ~1e-5; the service does the same: search.pg_queries._union). Categories scanned exactly, legacy indexes on
  embeddings and a Citus coordinator (no partitions) keep full-precision scores.
imsrc._neighbours is taken as the database holds it and only those two parts are replaced.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op
from sqlalchemy import text

revision: str = "0018_halfvec_walks"
down_revision: str | None = "0017_fallback_categories"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEIGHBOURS = "imsrc._neighbours(integer, integer, vector, integer, bigint[], bigint[], text)"

GLOBAL_TYPE = """
CREATE FUNCTION imsrc._global_type(p_model_id int, p_dimension int) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_indexes
                              WHERE tablename = 'embeddings'
                                AND indexname = format('ix_embeddings_hnsw_m%s', p_model_id)
                                AND indexdef NOT LIKE '%halfvec%')
                THEN format('vector(%s)', p_dimension) ELSE format('halfvec(%s)', p_dimension) END
$$;
"""

GLOBAL_OLD = """\
            'SELECT image_id, 1 - (%1$s <=> %2$s) FROM embeddings WHERE model_id = %3$s'
            ' ORDER BY %1$s <=> %2$s LIMIT %4$s', e, q, p_model_id, p_limit)"""
GLOBAL_NEW = """\
            'SELECT image_id, 1 - (embedding <=> $1) FROM embeddings WHERE model_id = %3$s'
            ' ORDER BY %1$s <=> %2$s LIMIT %4$s',
            format('(embedding::%s)', imsrc._global_type(p_model_id, p_dimension)),
            format('$1::%s', imsrc._global_type(p_model_id, p_dimension)), p_model_id, p_limit)"""

BRANCH_NEW = """\
    SELECT array_agg(CASE WHEN walk AND imsrc._category_partition(category_id) IS NOT NULL THEN format(
               '(SELECT image_id, 1 - ((embedding::halfvec(%3$s)) <=> %4$s) AS score FROM category_vectors'
               ' WHERE model_id = %1$s AND category_id = %2$s ORDER BY (embedding::halfvec(%3$s)) <#> %4$s'
               ' LIMIT %5$s)', p_model_id, category_id, p_dimension, h, p_limit)
           ELSE format(
               '(SELECT image_id, 1 - (e <=> %6$s) AS score FROM (SELECT image_id, %1$s AS e FROM embeddings'
               ' WHERE model_id = %2$s AND category_id = %3$s ORDER BY %4$s LIMIT %5$s) x)', e, p_model_id,
               category_id, CASE WHEN walk THEN format('(embedding::halfvec(%s)) <#> %s', p_dimension, h)
                                 ELSE format('(%s <=> %s) + 0', e, q) END, p_limit, q) END),"""
OUTER_OLD = """\
    sql := format('SELECT image_id, 1 - (e <=> %s) AS score FROM (%s) s ORDER BY score DESC, image_id LIMIT %s',
                  q, array_to_string(branches, ' UNION ALL '), p_limit);"""
OUTER_NEW = """\
    sql := format('SELECT image_id, score FROM (%s) s ORDER BY score DESC, image_id LIMIT %s',
                  array_to_string(branches, ' UNION ALL '), p_limit);"""


def _revision(filename: str) -> ModuleType:
    """An earlier revision's module (its helpers and the texts it wrote), loaded from this folder."""
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py"), Path(__file__).with_name(filename))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _migration_0016() -> ModuleType:
    return _revision("2026_12_07_1300-ann_width.py")


def _branch_old() -> str:
    """The walked-branch text 0013 wrote into imsrc._neighbours (its NEW_BRANCH), replaced here."""
    return str(_revision("2026_12_07_1000-category_vectors.py").NEW_BRANCH)


def _partitioned() -> bool:
    """Whether imsrc._neighbours walks partitions (plain PostgreSQL since 0013; not a Citus coordinator)."""
    definition = op.get_bind().execute(text(f"SELECT pg_get_functiondef('{NEIGHBOURS}'::regprocedure)")).scalar()
    return "FROM category_vectors" in str(definition)


def upgrade() -> None:
    m0016 = _migration_0016()
    op.execute(GLOBAL_TYPE)
    m0016.swap(NEIGHBOURS, GLOBAL_OLD, GLOBAL_NEW)
    if _partitioned():
        m0016.swap(NEIGHBOURS, _branch_old(), BRANCH_NEW)
        m0016.swap(NEIGHBOURS, OUTER_OLD, OUTER_NEW)
    m0016.grant("imsrc._global_type(integer, integer)")


LEGACY_MODELS = """
SELECT m.id, m.dimension, array_to_string(c.reloptions, ', ')
  FROM embedding_models m JOIN pg_class c ON c.relname = 'ix_embeddings_hnsw_m' || m.id AND c.relkind = 'i'
  JOIN pg_indexes x ON x.indexname = c.relname AND x.tablename = 'embeddings'
 WHERE m.dimension <= 2000 AND x.indexdef LIKE '%halfvec%'
"""


def downgrade() -> None:
    conn = op.get_bind()
    for model_id, dimension, options in conn.execute(text(LEGACY_MODELS)).all():
        name = f"ix_embeddings_hnsw_m{int(model_id)}"
        op.execute(f"DROP INDEX {name}")
        op.execute(
            f"CREATE INDEX {name} ON embeddings USING hnsw ((embedding::vector({int(dimension)})) vector_cosine_ops)"
            + (f" WITH ({options})" if options else "")
            + f" WHERE model_id = {int(model_id)}"
        )
    m0016 = _migration_0016()
    if _partitioned():
        m0016.swap(NEIGHBOURS, OUTER_NEW, OUTER_OLD)
        m0016.swap(NEIGHBOURS, BRANCH_NEW, _branch_old())
    m0016.swap(NEIGHBOURS, GLOBAL_NEW, GLOBAL_OLD)
    op.execute("DROP FUNCTION imsrc._global_type(integer, integer)")
