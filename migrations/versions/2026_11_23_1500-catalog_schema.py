"""Catalog schema: categories, images, originals, thumbnails, models, embeddings, prototypes.

Revision ID: 0001_catalog
Revises:
Create Date: 2026-11-23 15:00

Why the shapes:
- embeddings keep one row per (model, image) in one table with an untyped `vector` column, so several
  models of different dimensions live side by side. Each model gets its own HNSW index, a partial index on
  `(embedding::vector(d))` WHERE model_id = m, created when the model is registered (see
  imsrc.catalog.repository.ModelRepository.ensure_index); adding a model never rewrites other rows.
- embeddings.category_id copies images.category_id (kept by a trigger) so per-category search can use an
  index on (model_id, category_id) and per-category partial indexes without a join.
- embedding storage is MAIN: a 512-d float32 vector is just over the TOAST threshold, and out-of-line
  storage made exact scans 3.4x slower in our probe. MAIN keeps it in the row unless the row cannot fit a page.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import BIT, VECTOR
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001_catalog"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    op.create_table(
        "categories",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("is_automatic", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.CheckConstraint("length(btrim(name)) > 0", name="name_not_blank"),
    )
    op.create_index("uq_categories_lower_name", "categories", [sa.text("lower(name)")], unique=True)

    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("sha256", sa.LargeBinary, nullable=False),
        sa.Column("phash", BIT(64)),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("original_name", sa.Text),
        sa.Column("source_path", sa.Text),
        sa.Column("caption", sa.Text),
        sa.Column("category_id", sa.BigInteger, sa.ForeignKey("categories.id", ondelete="SET NULL")),
        sa.Column("predicted_category_id", sa.BigInteger,
                  sa.ForeignKey("categories.id", ondelete="SET NULL")),
        sa.Column("predicted_score", sa.Float),
        sa.Column("canonical_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="SET NULL")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.UniqueConstraint("sha256"),
        sa.CheckConstraint("octet_length(sha256) = 32", name="sha256_length"),
        sa.CheckConstraint("width > 0 AND height > 0", name="positive_size"),
        sa.CheckConstraint("canonical_id IS NULL OR canonical_id <> id", name="not_own_canonical"),
    )
    op.create_index("ix_images_category_id", "images", ["category_id"])
    op.create_index("ix_images_canonical_id", "images", ["canonical_id"])
    op.create_index("ix_images_source_path", "images", ["source_path"])

    op.create_table(
        "image_blobs",
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "thumbnails",
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("mime_type", sa.Text, nullable=False, server_default="image/webp"),
    )

    op.create_table(
        "embedding_models",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("dimension", sa.Integer, nullable=False),
        sa.Column("family", sa.Text, nullable=False),
        sa.Column("params", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("supports_text", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.UniqueConstraint("name"),
        sa.CheckConstraint("dimension > 0 AND dimension <= 16000", name="dimension_range"),
    )
    # At most one active model per catalog.
    op.create_index("uq_embedding_models_active", "embedding_models", ["is_active"], unique=True,
                    postgresql_where=sa.text("is_active"))

    op.create_table(
        "embeddings",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("embedding_models.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("category_id", sa.BigInteger),
        sa.Column("embedding", VECTOR(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    )
    op.execute("ALTER TABLE embeddings ALTER COLUMN embedding SET STORAGE MAIN")
    op.create_index("ix_embeddings_model_id_category_id", "embeddings", ["model_id", "category_id"])
    op.create_index("ix_embeddings_image_id", "embeddings", ["image_id"])
    # Keep embeddings.category_id equal to images.category_id whoever changes it (API, CLI or plain SQL).
    op.execute(
        """
        CREATE FUNCTION imsrc_sync_embedding_category() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE embeddings SET category_id = NEW.category_id WHERE image_id = NEW.id;
            RETURN NEW;
        END $$;
        CREATE TRIGGER trg_images_category_sync AFTER UPDATE OF category_id ON images
            FOR EACH ROW WHEN (OLD.category_id IS DISTINCT FROM NEW.category_id)
            EXECUTE FUNCTION imsrc_sync_embedding_category();
        CREATE FUNCTION imsrc_fill_embedding_category() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            SELECT category_id INTO NEW.category_id FROM images WHERE id = NEW.image_id;
            RETURN NEW;
        END $$;
        CREATE TRIGGER trg_embeddings_fill_category BEFORE INSERT ON embeddings
            FOR EACH ROW EXECUTE FUNCTION imsrc_fill_embedding_category();
        """
    )

    op.create_table(
        "category_prototypes",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("category_id", sa.BigInteger, sa.ForeignKey("categories.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("embedding_models.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("kind", sa.Text, nullable=False, server_default="mean"),
        sa.Column("ordinal", sa.Integer, nullable=False, server_default="0"),
        sa.Column("vector", VECTOR(), nullable=False),
        sa.Column("member_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.UniqueConstraint("category_id", "model_id", "kind", "ordinal"),
        sa.CheckConstraint("kind IN ('mean', 'cluster', 'text')", name="kind_known"),
    )
    op.create_index("ix_category_prototypes_model_id", "category_prototypes", ["model_id"])

    _create_views()
    _create_reader_role()


def _create_views() -> None:
    op.execute(
        """
        CREATE VIEW catalog_images AS
        SELECT i.id,
               encode(i.sha256, 'hex') AS sha256,
               i.original_name,
               i.source_path,
               (b.image_id IS NOT NULL) AS stored_in_database,
               c.name AS category,
               pc.name AS predicted_category,
               i.predicted_score,
               i.width, i.height, i.format, i.byte_size,
               i.phash::text AS phash,
               i.canonical_id,
               (i.canonical_id IS NOT NULL) AS is_duplicate,
               (SELECT count(*) FROM images d WHERE d.canonical_id = i.id) AS duplicate_count,
               coalesce((SELECT array_agg(m.name ORDER BY m.name)
                           FROM embeddings e JOIN embedding_models m ON m.id = e.model_id
                          WHERE e.image_id = i.id), '{}') AS embedded_models,
               i.caption,
               i.created_at
          FROM images i
          LEFT JOIN categories c ON c.id = i.category_id
          LEFT JOIN categories pc ON pc.id = i.predicted_category_id
          LEFT JOIN image_blobs b ON b.image_id = i.id;

        COMMENT ON VIEW catalog_images IS
            'One row per image: category, size, dimensions, duplicate status and the models that embedded it';

        CREATE VIEW catalog_categories AS
        SELECT c.id, c.name, c.description, c.is_automatic,
               count(i.id) AS image_count,
               count(i.id) FILTER (WHERE i.canonical_id IS NULL) AS unique_image_count,
               coalesce(sum(i.byte_size), 0)::bigint AS total_bytes,
               (SELECT count(*) FROM category_prototypes p WHERE p.category_id = c.id) AS prototype_count,
               c.created_at
          FROM categories c
          LEFT JOIN images i ON i.category_id = c.id
         GROUP BY c.id;

        COMMENT ON VIEW catalog_categories IS 'One row per category with image counts';

        CREATE VIEW catalog_embeddings AS
        SELECT e.image_id, m.name AS model, m.dimension, m.is_active AS active_model,
               e.category_id, e.embedding, e.created_at
          FROM embeddings e JOIN embedding_models m ON m.id = e.model_id;

        COMMENT ON VIEW catalog_embeddings IS
            'One row per (image, model) with its vector; compare vectors with <=> (cosine distance)';

        CREATE VIEW catalog_models AS
        SELECT m.id, m.name, m.dimension, m.family, m.supports_text, m.is_active, m.params,
               (SELECT count(*) FROM embeddings e WHERE e.model_id = m.id) AS embedded_images,
               m.created_at
          FROM embedding_models m;

        COMMENT ON VIEW catalog_models IS 'Embedding models in this catalog and how many images each embedded';
        """
    )


def _create_reader_role() -> None:
    # Roles are cluster-wide; another imsrc database on the same server may have created it already.
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                CREATE ROLE imsrc_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'cannot create role imsrc_reader (no CREATEROLE); imsrc sql will need IMSRC_READER_URL';
        END $$;
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                EXECUTE 'ALTER ROLE imsrc_reader SET default_transaction_read_only = on';
                EXECUTE 'ALTER ROLE imsrc_reader SET statement_timeout = ''60s''';
                EXECUTE format('GRANT CONNECT ON DATABASE %I TO imsrc_reader', current_database());
                EXECUTE 'GRANT USAGE ON SCHEMA public TO imsrc_reader';
                EXECUTE 'GRANT SELECT ON ALL TABLES IN SCHEMA public TO imsrc_reader';
                EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO imsrc_reader';
            END IF;
        END $$;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM imsrc_reader';
                EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM imsrc_reader';
                EXECUTE 'REVOKE USAGE ON SCHEMA public FROM imsrc_reader';
                EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM imsrc_reader', current_database());
            END IF;
        END $$;
        """
    )
    op.execute("DROP VIEW IF EXISTS catalog_models, catalog_embeddings, catalog_categories, catalog_images")
    op.drop_table("category_prototypes")
    op.execute("DROP TRIGGER IF EXISTS trg_images_category_sync ON images")
    op.drop_table("embeddings")
    op.execute("DROP FUNCTION IF EXISTS imsrc_sync_embedding_category(), imsrc_fill_embedding_category()")
    op.drop_table("embedding_models")
    op.drop_table("thumbnails")
    op.drop_table("image_blobs")
    op.drop_table("images")
    op.drop_table("categories")
    # The vector extension stays: other schemas on the server may use it, and dropping it is irreversible.
