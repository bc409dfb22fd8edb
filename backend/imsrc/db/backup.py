"""Backups with the PostgreSQL tools that ship with the embedded server (pg_dump/pg_restore, custom format).

A dump holds the whole catalog: rows, vectors, stored originals and thumbnails. Referenced files are not
copied; the caller tells the user how many there are. Restore runs in one transaction, so a failed restore
leaves the target database as it was.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from imsrc.db.embedded import _exe, _last_meaningful_line
from imsrc.errors import ConflictError, ImsrcError, InvalidInputError

READER_ROLE_SQL = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        CREATE ROLE imsrc_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
        ALTER ROLE imsrc_reader SET default_transaction_read_only = on;
        ALTER ROLE imsrc_reader SET statement_timeout = '60s';
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot create role imsrc_reader';
END $$;
"""


@dataclass
class BackupSummary:
    file: str
    bytes: int
    images: int
    stored_originals: int
    referenced_files: int


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _tool_login(url: str) -> tuple[str, dict[str, str]]:
    """The --dbname for pg_dump/pg_restore without its password, which goes in the environment instead: a
    command line can be read by every local user (ps, /proc), the environment only by the same user."""
    parsed = make_url(url).set(drivername="postgresql")
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    # URL.set(password=None) would keep the password: None means "unchanged" there.
    return parsed._replace(password=None).render_as_string(hide_password=False), env


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, env=env)
    if result.returncode != 0:
        raise ImsrcError(f"{what} failed: {_last_meaningful_line(result.stderr) or result.returncode}")


CITUS_REFUSAL = (
    "imsrc {what} does not work on a Citus cluster: pg_dump and pg_restore see only the coordinator, while the "
    "vectors live in shards on the workers, so the file would silently miss them. Back up the cluster the Citus "
    "way: a base backup and WAL archive of every node (pg_basebackup, or the provider's snapshots), with "
    "SELECT citus_create_restore_point('name') on the coordinator before, and restore every node to that point "
    "(point-in-time recovery with recovery_target_name); see README 'Scaling out'"
)


def is_citus_catalog(url: str) -> bool:
    """Whether the catalog at `url` is distributed by Citus (migration 0010_citus)."""
    with psycopg.connect(_libpq(url)) as conn:
        row = conn.execute("SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return False
        found = conn.execute("SELECT count(*) FROM pg_dist_partition WHERE partmethod = 'h'").fetchone()
        return bool(found and found[0])


def backup(url: str, file: Path) -> BackupSummary:
    if is_citus_catalog(url):
        raise ConflictError(CITUS_REFUSAL.format(what="backup"))
    file = file.expanduser().resolve()
    if not file.parent.is_dir():
        raise InvalidInputError(f"folder {file.parent} does not exist")
    tmp = file.with_name(file.name + ".partial")
    # pg_dump takes a consistent snapshot; writing to .partial and renaming means a crash never leaves a
    # truncated file under the real name.
    dbname, env = _tool_login(url)
    _run([_exe("pg_dump"), "--format=custom", "--no-owner", "--file", str(tmp), "--dbname", dbname], "pg_dump", env)
    tmp.replace(file)
    with psycopg.connect(_libpq(url)) as conn:
        images, stored, referenced = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE stored_in_database),"
            " count(*) FILTER (WHERE NOT stored_in_database AND source_path IS NOT NULL) FROM catalog_images"
        ).fetchone() or (0, 0, 0)
    return BackupSummary(str(file), file.stat().st_size, int(images), int(stored), int(referenced))


def database_is_empty(url: str) -> bool:
    with psycopg.connect(_libpq(url)) as conn:
        row = conn.execute("SELECT to_regclass('public.images') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return True
        count = conn.execute("SELECT count(*) FROM images").fetchone()
        return bool(count is not None and count[0] == 0)


def restore(url: str, file: Path, *, force: bool = False) -> None:
    if is_citus_catalog(url):
        raise ConflictError(CITUS_REFUSAL.format(what="restore"))
    file = file.expanduser().resolve()
    if not file.is_file():
        raise InvalidInputError(f"backup file {file} does not exist")
    listing = subprocess.run([_exe("pg_restore"), "--list", str(file)], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise InvalidInputError(f"{file} is not an imsrc backup (pg_restore cannot read it)")
    if not database_is_empty(url) and not force:
        raise ConflictError(
            "the target catalog already holds images; restore into an empty data directory or "
            "database, or pass --force to replace it"
        )
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(READER_ROLE_SQL)
        # Whatever the target holds (an empty schema made by auto-migration, or a catalog being replaced with
        # --force) is dropped inside the same transaction as the restore.
    dbname, env = _tool_login(url)
    _run(
        [
            _exe("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            "--dbname",
            dbname,
            str(file),
        ],
        "pg_restore",
        env,
    )
