"""Region vectors: one row per (model, image, window) for match=partial (issue 18, item 2).

Revision ID: 0008_region_embeddings
Revises: 0007_sql_search_duplicates_first
Create Date: 2026-12-07 05:00

Own table, not more rows in `embeddings`: the whole-image search path (its per-category indexes, FAISS
change log, prototypes, imsrc.search) must not see windows, and a catalog without regions pays nothing.
Boxes are fractions of the image's width and height (x0, y0, x1, y1), so they survive thumbnails and any
display size. The vector column is untyped like embeddings.embedding (several models, several widths); the
per-model HNSW index is created by the first region pass (search/regions.py), which knows the dimension.
Stored in the row, uncompressed where it fits (same reasons as 0004_embeddings_uncompressed). No category
column: partial search walks one graph per model and filters by category only in exact scans (join).
Primary key (model_id, image_id, region); an image's rows go with it (ON DELETE CASCADE), so deletes need
no extra code.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_region_embeddings"
down_revision: str | None = "0007_sql_search_duplicates_first"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE region_embeddings (
            model_id integer NOT NULL REFERENCES embedding_models (id) ON DELETE CASCADE,
            image_id bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
            region smallint NOT NULL,
            x0 real NOT NULL, y0 real NOT NULL, x1 real NOT NULL, y1 real NOT NULL,
            embedding vector NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_region_embeddings PRIMARY KEY (model_id, image_id, region),
            CONSTRAINT ck_region_embeddings_box CHECK (0 <= x0 AND x0 < x1 AND x1 <= 1 AND 0 <= y0 AND y0 < y1
                                                       AND y1 <= 1)
        )""")
    op.execute("ALTER TABLE region_embeddings ALTER COLUMN embedding SET STORAGE MAIN")
    op.execute("ALTER TABLE region_embeddings SET (toast_tuple_target = 8160)")
    op.execute("CREATE INDEX ix_region_embeddings_image_id ON region_embeddings (image_id)")
    # The read-only role reads every catalog table (db/roles); grant it this one when it exists.
    op.execute("""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                GRANT SELECT ON region_embeddings TO imsrc_reader;
            END IF;
        END $$""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS region_embeddings")
