"""Embeddings stay uncompressed in the row, so exact scans read them instead of decompressing them.

Revision ID: 0004_embeddings_uncompressed
Revises: 0003_search
Create Date: 2026-12-02 01:00

Why: the embedding column has STORAGE MAIN (in the row, not out of line), but any row over the TOAST
threshold (~2 KB, i.e. every vector over ~500 dimensions) is first *compressed* by PostgreSQL when pglz saves
25 %. Real CNN features (EfficientNet-Lite0 after ReLU6 and pooling) are full of exact zeros, so they did
compress, and every distance computed on the heap then decompressed the 5 KB vector first, twice per row
(the score and the ORDER BY): an exact scan of 3,000 rows took ~40-60 ms instead of ~4 ms, and two-stage
search on small catalogs (exact branches) paid the same (bench/search/service_bench.py, issue 14). HNSW
indexes keep their own uncompressed copies, which is why `ann` was fast on the same catalog.

toast_tuple_target = 8160 (PostgreSQL's maximum) means rows are compressed only once they no longer fit a
page: vectors up to ~2,000 dimensions are stored plain (the table grows; for sparse features about 2x), wider
ones are still compressed and moved out of line as before. Rows already stored compressed are rewritten once
(user triggers off: the values do not change, so nothing downstream needs to hear of it; the HNSW indexes
receive the new row versions, which costs about as much as building them).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004_embeddings_uncompressed"
down_revision: str | None = "0003_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOAST_TARGET_MAX = 8160


def upgrade() -> None:
    op.execute(f"ALTER TABLE embeddings SET (toast_tuple_target = {TOAST_TARGET_MAX})")
    op.execute("ALTER TABLE embeddings DISABLE TRIGGER USER")
    # real[] round trip: a fresh, uncompressed value (an unchanged one would be stored compressed again).
    op.execute("UPDATE embeddings SET embedding = CAST(CAST(embedding AS real[]) AS vector) "
               "WHERE pg_column_compression(embedding) IS NOT NULL AND vector_dims(embedding) <= 2000")
    op.execute("ALTER TABLE embeddings ENABLE TRIGGER USER")


def downgrade() -> None:
    op.execute("ALTER TABLE embeddings RESET (toast_tuple_target)")
