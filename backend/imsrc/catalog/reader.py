"""Read-only catalog queries on a plain psycopg connection, for the CLI commands that must start at once
(`imsrc stats`, `categories list`, `jobs`): no SQLAlchemy, no ORM models, no NumPy (db.direct says why).

The statements without parameters are shared with the SQLAlchemy repositories (catalog.repository,
ingest.repository), so the API and the CLI report the same numbers from the same SQL.
"""

from __future__ import annotations

from typing import Any

import psycopg

COUNTS_SQL = (
    "SELECT (SELECT count(*) FROM images) AS images,"
    " (SELECT count(*) FROM images WHERE canonical_id IS NOT NULL) AS duplicates,"
    " (SELECT count(*) FROM image_blobs) AS stored_originals,"
    " (SELECT count(*) FROM categories) AS categories,"
    " (SELECT count(*) FROM embeddings) AS embeddings,"
    " (SELECT coalesce(sum(byte_size), 0) FROM images)::bigint AS image_bytes,"
    " pg_database_size(current_database()) AS database_bytes"
)
MODELS_SQL = "SELECT name, dimension, family, supports_text, is_active, embedded_images FROM catalog_models ORDER BY id"
CATEGORIES_SQL = "SELECT * FROM catalog_categories ORDER BY lower(name)"


class CatalogReader:
    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self.conn = conn

    def counts(self) -> dict[str, Any]:
        row = self.conn.execute(COUNTS_SQL).fetchone()
        assert row is not None
        return row

    def models(self) -> list[dict[str, Any]]:
        return self.conn.execute(MODELS_SQL).fetchall()

    def categories(self) -> list[dict[str, Any]]:
        return self.conn.execute(CATEGORIES_SQL).fetchall()

    def recent_jobs(self, limit: int) -> list[dict[str, Any]]:
        return self.conn.execute("SELECT * FROM ingest_jobs ORDER BY id DESC LIMIT %s", (limit,)).fetchall()
