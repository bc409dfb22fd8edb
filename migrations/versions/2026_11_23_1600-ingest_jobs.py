"""Ingest bookkeeping: jobs, per-file outcomes, and the paths each image came from.

Revision ID: 0002_ingest
Revises: 0001_catalog
Create Date: 2026-11-23 16:00

Why the shapes:
- ingest_jobs records what was asked (paths, options) and a `job_key` fingerprint of it, so re-running the
  same command after a crash finds the unfinished job and continues it instead of starting over.
- ingest_files keeps one row per file a job decided about (new, duplicate, linked, failed) and why; the
  (job_id, path) key is how a resumed job knows what is already done. Unchanged files skipped on a re-run
  are only counted, so re-indexing a million-file folder does not add a million rows per run.
- image_sources maps every path to the image holding its content: identical bytes at several paths are
  one image with several sources, and a path whose size and mtime are unchanged is skipped without
  reading it. path is unique: one path shows one content at a time.
- The reader role gets SELECT on the new tables through the default privileges set in 0001; the GRANT
  below also covers databases where those defaults were set by another owner.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0002_ingest"
down_revision: str | None = "0001_catalog"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "ingest_jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False, server_default="index"),
        sa.Column("job_key", sa.Text, nullable=False),
        sa.Column("paths", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.Column("options", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("embedding_models.id", ondelete="SET NULL")),
        sa.Column("model_name", sa.Text),
        sa.Column("files_total", sa.BigInteger),
        sa.Column("new_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicate_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("linked_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("skipped_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("message", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('running', 'interrupted', 'completed', 'failed')", name="status_known"),
        sa.CheckConstraint("kind IN ('index', 'demo', 'embed')", name="kind_known"),
    )
    op.create_index("ix_ingest_jobs_job_key", "ingest_jobs", ["job_key", "id"])

    op.create_table(
        "ingest_files",
        sa.Column("job_id", sa.BigInteger, sa.ForeignKey("ingest_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="SET NULL")),
        sa.Column("sha256", sa.LargeBinary),
        sa.Column("byte_size", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.CheckConstraint("outcome IN ('new', 'duplicate', 'linked', 'skipped', 'failed')", name="outcome_known"),
    )
    # `imsrc jobs show` lists failures; most rows are not failures.
    op.create_index("ix_ingest_files_failed", "ingest_files", ["job_id"],
                    postgresql_where=sa.text("outcome = 'failed'"))
    op.create_index("ix_ingest_files_image_id", "ingest_files", ["image_id"])

    op.create_table(
        "image_sources",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("job_id", sa.BigInteger, sa.ForeignKey("ingest_jobs.id", ondelete="SET NULL")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.UniqueConstraint("path"),
    )
    op.create_index("ix_image_sources_image_id", "image_sources", ["image_id"])

    op.execute(
        """
        CREATE VIEW catalog_jobs AS
        SELECT j.id, j.kind, j.status, j.paths, j.model_name AS model, j.files_total,
               j.new_count, j.duplicate_count, j.linked_count, j.skipped_count, j.failed_count,
               j.options, j.message, j.started_at, j.finished_at
          FROM ingest_jobs j;

        COMMENT ON VIEW catalog_jobs IS
            'One row per indexing job: what it was asked to do, its status and outcome counts';

        CREATE VIEW catalog_image_sources AS
        SELECT s.image_id, s.path, s.byte_size, s.job_id, s.created_at
          FROM image_sources s;

        COMMENT ON VIEW catalog_image_sources IS
            'Every file path an image was found at (identical files at several paths share one image)';
        """
    )
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
                EXECUTE 'GRANT SELECT ON ingest_jobs, ingest_files, image_sources, catalog_jobs,'
                        ' catalog_image_sources TO imsrc_reader';
            END IF;
        END $$;
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS catalog_image_sources, catalog_jobs")
    op.drop_table("image_sources")
    op.drop_table("ingest_files")
    op.drop_table("ingest_jobs")
