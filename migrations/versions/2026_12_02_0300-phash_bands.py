"""Four btree indexes on the 16-bit bands of images.phash, for near-duplicate look-ups at search time.

Revision ID: 0006_phash_bands
Revises: 0005_sql_search
Create Date: 2026-12-02 03:00

Why bands: a query must find every image within Hamming distance t of its 64-bit hash. Split into four 16-bit
bands, two hashes within distance t differ by at most t // 4 bits in at least one band (pigeonhole), so the
candidates are the rows with some band equal to one of the few values within that many bits of the query's
band (t 0-3: the band itself; t 4-7, the default 4 among them: 17 values per band). Each band is one btree
probe (a BitmapOr of four index scans); the exact distance, bit_count(phash # q), is then checked on the
few rows found. The expressions must match search/duplicates.py exactly, or the planner cannot use them.
Partial (phash IS NOT NULL): images without a hash can never be near-duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_phash_bands"
down_revision: str | None = "0005_sql_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BANDS = 4


def _band(i: int) -> str:
    return f"(((phash::bigint >> {48 - 16 * i}) & 65535)::int)"


def upgrade() -> None:
    for i in range(BANDS):
        op.execute(f"CREATE INDEX ix_images_phash_band{i} ON images ({_band(i)}) WHERE phash IS NOT NULL")


def downgrade() -> None:
    for i in range(BANDS):
        op.execute(f"DROP INDEX IF EXISTS ix_images_phash_band{i}")
