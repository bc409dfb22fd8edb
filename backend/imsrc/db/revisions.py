"""What a database must have for imsrc, checked without SQLAlchemy or alembic (both slow to import): the
pgvector version and the newest migration shipped. Used by the full engine (db.engine) and by the plain psycopg
connections of the CLI's read-only commands (db.direct)."""

from __future__ import annotations

import re
from pathlib import Path

from imsrc.resources import migrations_dir

MIN_PGVECTOR = (0, 8, 0)
# The installed pgvector, else the one the server could install (CREATE EXTENSION runs in the first migration).
PGVECTOR_VERSION_SQL = (
    "SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
    " (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'))"
)


def parse_version(value: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", value)[:3])


# The plain form every revision file here has (`revision: str = "0002_ingest"`, `down_revision ... = "0001_..."`).
_REVISION_LINE = re.compile(r"""^revision(?:\s*:[^=\n]+)?\s*=\s*["']([^"'\n]+)["']\s*$""", re.M)
_DOWN_REVISION_LINE = re.compile(r"""^down_revision(?:\s*:[^=\n]+)?\s*=\s*(?:None|["']([^"'\n]+)["'])\s*$""", re.M)


def linear_head(versions: Path | None = None) -> str | None:
    """The newest revision, read from the migration files without importing alembic, when they form one plain
    chain; None for anything else (a merge, a tuple, a file in another form), and then alembic decides. Only
    ever used to confirm that a database is already up to date, the common case of every command's start."""
    revisions: set[str] = set()
    parents: set[str] = set()
    files = list((versions or migrations_dir() / "versions").glob("*.py"))
    for path in files:
        source = path.read_text(encoding="utf-8")
        revision, down = _REVISION_LINE.findall(source), _DOWN_REVISION_LINE.findall(source)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        if down[0]:
            parents.add(down[0])
    heads = revisions - parents
    if len(revisions) != len(files) or not parents <= revisions or len(heads) != 1:
        return None
    return heads.pop()
