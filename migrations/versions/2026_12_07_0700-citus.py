"""On a Citus coordinator: distribute the embeddings by category, make the small tables reference tables.

Revision ID: 0010_citus
Revises: 0009_captions
Create Date: 2026-12-07 07:00

On plain PostgreSQL this revision does nothing: one Alembic history, two shapes. It acts when the database is
a Citus coordinator (the citus extension is created in it, or citus is in shared_preload_libraries, in which case
the extension is created here). Why the shape (db/README.md, "Citus"):

- embeddings is distributed by category_id (hash, citus.shard_count shards): stage 1 names the categories a
  query needs, so a one-category stage 2 is a router query to the one shard holding it, and the per-category
  partial HNSW indexes (CREATE INDEX through the coordinator, propagated to every shard) are used there.
  Citus forbids NULL in a distribution column, so uncategorised vectors have category_id 0 on Citus (no
  category has id 0: identities start at 1); the repositories say `category_id = 0` there instead of IS NULL.
  Every unique constraint must contain the distribution column: the primary key becomes
  (model_id, image_id, category_id); an image has one category, so (model_id, image_id) stays unique in
  practice, through the triggers below.
- categories, embedding_models and category_prototypes are reference tables (small, read by every query:
  stage 1, joins for names), copied to every node.
- images, image_blobs, thumbnails, image_sources, ingest_jobs, ingest_files stay on the coordinator as Citus
  local tables (in Citus' metadata, so they keep their foreign keys to the reference tables and can be joined
  with them). Images are looked up by id, sha256 and pHash, never by category, so co-locating them with the
  vectors would win nothing and lose the global sha256 uniqueness that duplicate detection relies on.
  Their bytes (image_blobs) are the one thing that grows as fast as the vectors: at that size keep originals as
  files (`--store reference`); see README "Scaling out".
- search_state and embedding_changes stay plain local tables. The change log feeds the in-process FAISS index,
  which a Citus catalog does not use (the search service refuses backend=faiss there), so its triggers are
  dropped: triggers on distributed tables run on every shard, on the workers.

What Citus forbids and how the same behaviour is kept:
- Foreign keys from a distributed table to a local one: embeddings -> images is replaced by a statement trigger
  on images that deletes an image's vectors (ON DELETE CASCADE before). embeddings -> embedding_models
  (a reference table) stays, with its cascade.
- Updating the distribution column: an image's category change (re-categorising, a category deleted, automatic
  regrouping) moves its vectors: the trigger on images inserts them under the new category and deletes them
  under the old one, in the same transaction. Renaming an automatic category into a real one changes no ids.
- The BEFORE INSERT trigger that copied images.category_id into new vectors would run on the shard, after
  Citus has routed the row by the category it came with; inserts name the category themselves
  (IngestRepository.copy_embeddings).
Views: catalog_models counted vectors with a correlated subquery, which Citus cannot plan next to a reference
table; it and catalog_embeddings (category 0 shown as NULL) are redefined with the same columns.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from imsrc.db.citus import CITUS_SQL_FUNCTIONS_TO_PLPGSQL

revision: str = "0010_citus"
down_revision: str | None = "0009_captions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFERENCE_TABLES = ("categories", "embedding_models", "category_prototypes")
UNCATEGORISED = 0

RESHAPE = f"""
ALTER TABLE embeddings DROP CONSTRAINT fk_embeddings_image_id_images;
ALTER TABLE embeddings DROP CONSTRAINT fk_embeddings_model_id_embedding_models;
DROP TRIGGER IF EXISTS trg_embeddings_fill_category ON embeddings;
DROP TRIGGER IF EXISTS trg_embeddings_log_insert ON embeddings;
DROP TRIGGER IF EXISTS trg_embeddings_log_delete ON embeddings;
DROP TRIGGER IF EXISTS trg_embeddings_log_update ON embeddings;
DROP TRIGGER IF EXISTS trg_images_category_sync ON images;
UPDATE embeddings SET category_id = {UNCATEGORISED} WHERE category_id IS NULL;
ALTER TABLE embeddings ALTER COLUMN category_id SET DEFAULT {UNCATEGORISED},
                       ALTER COLUMN category_id SET NOT NULL;
ALTER TABLE embeddings DROP CONSTRAINT pk_embeddings;
ALTER TABLE embeddings ADD CONSTRAINT pk_embeddings PRIMARY KEY (model_id, image_id, category_id);
"""

TRIGGERS = f"""
-- The category of images changed (any UPDATE of images: re-categorised, category deleted, regrouped): move
-- their vectors to the shard of the new category, one INSERT ... SELECT and one DELETE per (old, new) pair.
CREATE OR REPLACE FUNCTION imsrc_sync_embedding_category() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved record;
BEGIN
    -- Writes to several shards after this transaction read reference tables: only sequential mode is allowed.
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    FOR moved IN
        SELECT coalesce(o.category_id, {UNCATEGORISED}) AS old_c, coalesce(n.category_id, {UNCATEGORISED}) AS new_c,
               array_agg(n.id) AS ids
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE o.category_id IS DISTINCT FROM n.category_id
         GROUP BY 1, 2
    LOOP
        EXECUTE format('INSERT INTO embeddings (model_id, image_id, category_id, embedding, created_at)'
                       ' SELECT model_id, image_id, %s, embedding, created_at FROM embeddings'
                       ' WHERE category_id = %s AND image_id = ANY($1)', moved.new_c, moved.old_c) USING moved.ids;
        EXECUTE format('DELETE FROM embeddings WHERE category_id = %s AND image_id = ANY($1)', moved.old_c)
            USING moved.ids;
    END LOOP;
    RETURN NULL;
END $$;
---
CREATE TRIGGER trg_images_category_sync AFTER UPDATE ON images
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION imsrc_sync_embedding_category();
---
-- What ON DELETE CASCADE of the foreign key did: the vectors of deleted images go with them.
CREATE FUNCTION imsrc_delete_image_embeddings() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    SELECT array_agg(id) INTO ids FROM old_rows;
    IF ids IS NOT NULL THEN
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
        DELETE FROM embeddings WHERE image_id = ANY(ids);
    END IF;
    RETURN NULL;
END $$;
---
CREATE TRIGGER trg_images_delete_embeddings AFTER DELETE ON images
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION imsrc_delete_image_embeddings();
"""

VIEWS = f"""
CREATE OR REPLACE VIEW catalog_embeddings AS
SELECT e.image_id, m.name AS model, m.dimension, m.is_active AS active_model,
       nullif(e.category_id, {UNCATEGORISED}) AS category_id, e.embedding, e.created_at
  FROM embeddings e JOIN embedding_models m ON m.id = e.model_id;
---
CREATE OR REPLACE VIEW catalog_models AS
SELECT m.id, m.name, m.dimension, m.family, m.supports_text, m.is_active, m.params,
       coalesce(n.embedded, 0) AS embedded_images, m.created_at
  FROM embedding_models m
  LEFT JOIN (SELECT model_id, count(*) AS embedded FROM embeddings GROUP BY model_id) n ON n.model_id = m.id;
"""


# Citus cannot plan a parameterised LANGUAGE sql function over its tables: the same rewrite runs after every
# migration on Citus (migrations/env.py), so functions that later revisions (re)create are rewritten too.
SQL_FUNCTIONS_TO_PLPGSQL = CITUS_SQL_FUNCTIONS_TO_PLPGSQL


def citus_wanted(connection: object) -> bool:
    """The database is a Citus coordinator: the extension exists here, or the server preloads it."""
    conn = connection  # a SQLAlchemy Connection
    if conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'citus'")).first():  # type: ignore[attr-defined]
        return True
    preload = conn.execute(text("SELECT current_setting('shared_preload_libraries')")).scalar()  # type: ignore[attr-defined]
    return "citus" in [p.strip().strip('"') for p in str(preload or "").split(",")]


def upgrade() -> None:
    conn = op.get_bind()
    if not citus_wanted(conn):
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS citus")
    nodes = conn.execute(text("SELECT count(*) FROM pg_dist_node WHERE isactive AND noderole = 'primary'"
                              " AND shouldhaveshards")).scalar()
    if not nodes:
        raise RuntimeError(
            "this database is a Citus coordinator without nodes for shards: add the workers first "
            "(SELECT citus_set_coordinator_host(...); SELECT citus_add_node(host, port) for each worker), "
            "then run imsrc migrate again")
    for statement in RESHAPE.split(";"):
        if statement.strip():
            op.execute(statement)
    for table in REFERENCE_TABLES:
        op.execute(f"SELECT create_reference_table('{table}')")
    # Already in the metadata (their foreign keys to reference tables put them there); this makes it explicit,
    # so Citus never turns them back into plain tables.
    op.execute("SELECT citus_add_local_table_to_metadata('images', cascade_via_foreign_keys => true)")
    op.execute("SELECT create_distributed_table('embeddings', 'category_id', colocate_with => 'none')")
    # Rows that existed before (a catalog moved onto Citus) were copied to the shards; free the coordinator's copy.
    op.execute("SELECT truncate_local_data_after_distributing_table('embeddings')")
    op.execute("ALTER TABLE embeddings ADD CONSTRAINT fk_embeddings_model_id_embedding_models"
               " FOREIGN KEY (model_id) REFERENCES embedding_models(id) ON DELETE CASCADE")
    # One statement at a time: Citus passes DDL on tables in its metadata to their shards by the statement's
    # text, and refuses a text that holds several commands.
    for statement in (TRIGGERS + "---" + VIEWS).split("---"):
        if statement.strip():
            op.execute(statement)
    op.execute(SQL_FUNCTIONS_TO_PLPGSQL)
    # Every session (imsrc's, and plain SQL users') reaches each worker over one connection per transaction:
    # Citus refuses to write images (which has foreign keys to reference tables) after a transaction read the
    # shards over several connections per worker, and catalog writes read vectors first. Workers still run in
    # parallel with each other. imsrc's own connections set it too (db/engine.py), should this be refused.
    op.execute("""
        DO $$
        BEGIN
            EXECUTE format('ALTER DATABASE %I SET citus.multi_shard_modify_mode = sequential', current_database());
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'not the database owner: set citus.multi_shard_modify_mode = sequential for SQL sessions';
        END $$;
    """)
    op.execute("""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                EXECUTE 'GRANT SELECT ON ALL TABLES IN SCHEMA public TO imsrc_reader';
            END IF;
        END $$;
    """)


def downgrade() -> None:
    conn = op.get_bind()
    if not conn.execute(text("SELECT to_regclass('pg_dist_partition')")).scalar():
        return
    if not conn.execute(text("SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'embeddings'::regclass")).first():
        return
    raise RuntimeError("a catalog distributed on Citus cannot be migrated below 0010_citus here: undistribute it "
                       "with undistribute_table('embeddings') and the reference tables first")
