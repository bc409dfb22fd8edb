"""All SQL of the ingest pipeline. Repositories take a Session and never commit."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.missing import missing_embedding_count, missing_filter
from imsrc.db.citus import UNCATEGORISED, distributed

JOB_LOCK_CLASS = 727_002  # pg advisory lock class: one process runs a given job at a time


@dataclass(frozen=True, slots=True)
class ExistingImage:
    id: int
    has_embedding: bool
    has_blob: bool
    category_id: int | None


@dataclass(frozen=True, slots=True)
class KnownSource:
    image_id: int
    byte_size: int
    mtime_ns: int


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def find_resumable(self, job_key: str) -> dict[str, Any] | None:
        row = self.session.execute(
            text(
                "SELECT * FROM ingest_jobs WHERE job_key = :k AND status IN ('running', 'interrupted')"
                " ORDER BY id DESC LIMIT 1"
            ),
            {"k": job_key},
        ).first()
        return dict(row._mapping) if row else None

    def create(
        self,
        *,
        kind: str,
        job_key: str,
        paths: Sequence[str],
        options: dict[str, Any],
        model_id: int | None,
        model_name: str | None,
    ) -> int:
        return int(
            self.session.execute(
                text(
                    "INSERT INTO ingest_jobs (kind, job_key, paths, options, model_id, model_name)"
                    " VALUES (:kind, :k, :p, CAST(:o AS jsonb), :m, :mn) RETURNING id"
                ),
                {
                    "kind": kind,
                    "k": job_key,
                    "p": list(paths),
                    "o": json.dumps(options, sort_keys=True),
                    "m": model_id,
                    "mn": model_name,
                },
            ).scalar_one()
        )

    def try_lock(self, job_id: int) -> bool:
        """Session-level lock held by this connection until it closes (a killed process releases it)."""
        return bool(
            self.session.execute(
                text("SELECT pg_try_advisory_lock(:c, :j)"), {"c": JOB_LOCK_CLASS, "j": int(job_id)}
            ).scalar_one()
        )

    def unlock(self, job_id: int) -> None:
        self.session.execute(text("SELECT pg_advisory_unlock(:c, :j)"), {"c": JOB_LOCK_CLASS, "j": int(job_id)})

    def mark(self, job_id: int, status: str, message: str | None = None, *, finished: bool = False) -> None:
        # Two spellings rather than CASE WHEN :f THEN now(): Citus refuses non-immutable functions inside CASE
        # on the tables in its metadata (ingest_jobs is one on a Citus coordinator).
        finished_at = "now()" if finished else "NULL"
        self.session.execute(
            text(
                "UPDATE ingest_jobs SET status = :s, message = coalesce(:msg, message), updated_at = now(),"
                f" finished_at = {finished_at} WHERE id = :j"
            ),
            {"s": status, "msg": message, "j": job_id},
        )

    def set_total(self, job_id: int, total: int) -> None:
        self.session.execute(text("UPDATE ingest_jobs SET files_total = :t WHERE id = :j"), {"t": total, "j": job_id})

    def add_counts(self, job_id: int, counts: dict[str, int]) -> None:
        self.session.execute(
            text(
                "UPDATE ingest_jobs SET new_count = new_count + :new, duplicate_count = duplicate_count + :duplicate,"
                " linked_count = linked_count + :linked, skipped_count = skipped_count + :skipped,"
                " failed_count = failed_count + :failed, updated_at = now() WHERE id = :j"
            ),
            {**{k: counts.get(k, 0) for k in ("new", "duplicate", "linked", "skipped", "failed")}, "j": job_id},
        )

    def get(self, job_id: int) -> dict[str, Any] | None:
        row = self.session.execute(text("SELECT * FROM ingest_jobs WHERE id = :j"), {"j": job_id}).first()
        return dict(row._mapping) if row else None

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.session.execute(text("SELECT * FROM ingest_jobs ORDER BY id DESC LIMIT :n"), {"n": limit})
        return [dict(r._mapping) for r in rows]

    def files(self, job_id: int, outcome: str | None = "failed", limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.session.execute(
            text(
                "SELECT path, outcome, reason, image_id FROM ingest_files WHERE job_id = :j"
                " AND (CAST(:o AS text) IS NULL OR outcome = :o) ORDER BY path LIMIT :n"
            ),
            {"j": job_id, "o": outcome, "n": limit},
        )
        return [dict(r._mapping) for r in rows]

    def done_paths(self, job_id: int, paths: Sequence[str]) -> set[str]:
        rows = self.session.execute(
            text("SELECT path FROM ingest_files WHERE job_id = :j AND path = ANY(:p)"), {"j": job_id, "p": list(paths)}
        )
        return {r[0] for r in rows}

    def record_files(
        self, job_id: int, rows: Sequence[tuple[str, str, str | None, int | None, bytes | None, int | None]]
    ) -> None:
        """rows: (path, outcome, reason, image_id, sha256, byte_size)."""
        if rows:
            self.session.execute(
                text(
                    "INSERT INTO ingest_files (job_id, path, outcome, reason, image_id, sha256, byte_size)"
                    " SELECT :j, * FROM unnest(CAST(:p AS text[]), CAST(:o AS text[]), CAST(:r AS text[]),"
                    " CAST(:i AS bigint[]), CAST(:s AS bytea[]), CAST(:b AS bigint[]))"
                    " ON CONFLICT (job_id, path) DO NOTHING"
                ),
                {"j": job_id, **_columns(rows, "porisb")},
            )


class _MissingMixin:
    session: Session

    def missing_embedding_count(self, model_id: int) -> int:
        return missing_embedding_count(self.session, model_id)

    def missing_embedding_page(self, model_id: int, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        """(id, sha256, stored bytes or None, a source path or None) of images lacking the model's vector."""
        rows = self.session.execute(
            text(
                "SELECT i.id, i.sha256, b.data, coalesce(i.source_path,"
                " (SELECT s.path FROM image_sources s WHERE s.image_id = i.id ORDER BY s.id LIMIT 1)) AS path"
                " FROM images i LEFT JOIN image_blobs b ON b.image_id = i.id WHERE i.id > :a AND"
                f" {missing_filter(self.session)} ORDER BY i.id LIMIT :n"
            ),
            {"m": model_id, "a": after_id, "n": limit},
        )
        return [tuple(r) for r in rows]


class IngestRepository(_MissingMixin):
    def __init__(self, session: Session) -> None:
        self.session = session

    def known_sources(self, paths: Sequence[str]) -> dict[str, KnownSource]:
        rows = self.session.execute(
            text("SELECT path, image_id, byte_size, mtime_ns FROM image_sources WHERE path = ANY(:p)"),
            {"p": list(paths)},
        )
        return {r.path: KnownSource(r.image_id, r.byte_size, r.mtime_ns) for r in rows}

    def existing_by_sha(self, shas: Iterable[bytes], model_id: int) -> dict[bytes, ExistingImage]:
        digests = list(set(shas))
        if not digests:
            return {}
        rows = self.session.execute(
            text(
                "SELECT i.id, i.sha256, i.category_id,"
                " EXISTS (SELECT 1 FROM image_blobs b WHERE b.image_id = i.id) AS has_blob"
                " FROM images i WHERE i.sha256 = ANY(:s)"
            ),
            {"s": digests},
        ).all()
        # The vectors are asked for separately: on Citus they are distributed and the images are not, and a
        # subquery correlating the two cannot be planned there. One indexed probe either way.
        embedded = (
            {
                int(r[0])
                for r in self.session.execute(
                    text("SELECT image_id FROM embeddings WHERE model_id = :m AND image_id = ANY(:i)"),
                    {"m": model_id, "i": [int(r.id) for r in rows]},
                )
            }
            if rows
            else set()
        )
        return {bytes(r.sha256): ExistingImage(r.id, int(r.id) in embedded, r.has_blob, r.category_id) for r in rows}

    def insert_images(self, rows: Sequence[dict[str, Any]]) -> dict[bytes, int]:
        """Insert in the given order (ids follow it); rows whose sha256 already exists are left out."""
        if not rows:
            return {}
        keys = (
            "sha256",
            "phash",
            "width",
            "height",
            "format",
            "byte_size",
            "original_name",
            "source_path",
            "category_id",
        )
        params = {k: [r[k] for r in rows] for k in keys}
        result = self.session.execute(
            text(
                "INSERT INTO images (sha256, phash, width, height, format, byte_size, original_name, source_path,"
                " category_id)"
                " SELECT s, p::bit(64), w, h, f, b, o, sp, c FROM unnest(CAST(:sha256 AS bytea[]),"
                " CAST(:phash AS bigint[]), CAST(:width AS int[]), CAST(:height AS int[]), CAST(:format AS text[]),"
                " CAST(:byte_size AS bigint[]), CAST(:original_name AS text[]), CAST(:source_path AS text[]),"
                " CAST(:category_id AS bigint[])) WITH ORDINALITY AS t(s, p, w, h, f, b, o, sp, c, ord)"
                " ORDER BY ord"
                " ON CONFLICT (sha256) DO NOTHING RETURNING id, sha256"
            ),
            params,
        )
        return {bytes(r.sha256): int(r.id) for r in result}

    def set_category_where_missing(self, pairs: Sequence[tuple[int, int]]) -> None:
        if pairs:
            self.session.execute(
                text(
                    "UPDATE images i SET category_id = v.c FROM unnest(CAST(:i AS bigint[]), CAST(:c AS bigint[]))"
                    " AS v(i, c) WHERE i.id = v.i AND i.category_id IS NULL"
                ),
                _columns(pairs, "ic"),
            )

    def set_canonical(self, pairs: Sequence[tuple[int, int | None]]) -> None:
        if pairs:
            self.session.execute(
                text(
                    "UPDATE images i SET canonical_id = v.c FROM unnest(CAST(:i AS bigint[]), CAST(:c AS bigint[]))"
                    " AS v(i, c) WHERE i.id = v.i AND i.canonical_id IS DISTINCT FROM v.c"
                ),
                _columns(pairs, "ic"),
            )

    def upsert_sources(self, rows: Sequence[tuple[str, int, int, int, int | None]]) -> None:
        """rows: (path, image_id, byte_size, mtime_ns, job_id); a known path now shows this image."""
        if rows:
            self.session.execute(
                text(
                    "INSERT INTO image_sources (path, image_id, byte_size, mtime_ns, job_id)"
                    " SELECT * FROM unnest(CAST(:p AS text[]), CAST(:i AS bigint[]), CAST(:b AS bigint[]),"
                    " CAST(:t AS bigint[]), CAST(:j AS bigint[]))"
                    " ON CONFLICT (path) DO UPDATE SET image_id = EXCLUDED.image_id, byte_size = EXCLUDED.byte_size,"
                    " mtime_ns = EXCLUDED.mtime_ns, job_id = EXCLUDED.job_id"
                ),
                _columns(rows, "pibtj"),
            )

    def delete_orphans(self, image_ids: Iterable[int]) -> int:
        """Images whose every source now shows other content and whose bytes are not stored: gone."""
        ids = sorted(set(image_ids))
        if not ids:
            return 0
        return _rowcount(
            self.session.execute(
                text(
                    "DELETE FROM images i WHERE i.id = ANY(:i)"
                    " AND NOT EXISTS (SELECT 1 FROM image_sources s WHERE s.image_id = i.id)"
                    " AND NOT EXISTS (SELECT 1 FROM image_blobs b WHERE b.image_id = i.id)"
                ),
                {"i": ids},
            )
        )

    def canonical_hashes(self) -> Iterator[tuple[int, int]]:
        """(id, unsigned phash) of every image that is not itself a duplicate, streamed."""
        result = self.session.execute(
            text(
                "SELECT id, phash::bigint AS h FROM images WHERE canonical_id IS NULL AND phash IS NOT NULL ORDER BY id"
            ).execution_options(yield_per=50_000)
        )
        for row in result:
            yield int(row.id), int(row.h) & ((1 << 64) - 1)

    # ---- bulk rows through COPY (binary): no per-row round trips, vectors sent as exact float32
    def copy_blobs(self, rows: Sequence[tuple[int, bytes]]) -> None:
        self._copy("image_blobs (image_id, data)", [(("q", i), ("b", d)) for i, d in rows])

    def copy_thumbnails(self, rows: Sequence[tuple[int, bytes, int, int]]) -> None:
        self._copy(
            "thumbnails (image_id, data, width, height, mime_type)",
            [(("q", i), ("b", d), ("i", w), ("i", h), ("b", b"image/webp")) for i, d, w, h in rows],
        )

    def copy_embeddings(self, model_id: int, rows: Sequence[tuple[int, np.ndarray]]) -> None:
        if not rows:
            return
        # Each vector goes under its image's category as of this transaction, and the images are locked FOR SHARE
        # until it commits: a concurrent re-categorisation waits, and its trigger then moves these vectors (and
        # their category_vectors copies) too. Unlocked, it could commit in between, move nothing (our rows were not
        # committed yet) and leave the new vector under the old category for good (embedding existing images;
        # new ones are our own rows). Plain PostgreSQL and Citus alike.
        categories = {
            int(r[0]): int(r[1])
            for r in self.session.execute(
                text(
                    f"SELECT id, coalesce(category_id, {UNCATEGORISED}) FROM images WHERE id = ANY(:i)"
                    " ORDER BY id FOR SHARE"
                ),
                {"i": [int(i) for i, _ in rows]},
            )
        }
        if not distributed(self.session):
            # A trigger copies each image's category into its vector row (the COPY's snapshot is after the lock).
            self._copy(
                "embeddings (model_id, image_id, embedding)",
                [(("i", model_id), ("q", i), ("b", _vector_binary(v))) for i, v in rows],
            )
            return
        # On Citus the row is routed to its shard by the category it arrives with (a trigger would run too late,
        # on the shard): the one read above.
        self._copy(
            "embeddings (model_id, image_id, category_id, embedding)",
            [
                (("i", model_id), ("q", i), ("q", categories.get(int(i), UNCATEGORISED)), ("b", _vector_binary(v)))
                for i, v in rows
            ],
        )

    def _copy(self, target: str, rows: Sequence[Sequence[tuple[str, Any]]]) -> None:
        if not rows:
            return
        raw = self.session.connection().connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0))
            for row in rows:
                parts = [struct.pack("!h", len(row))]
                for kind, value in row:
                    if kind == "q":
                        parts.append(struct.pack("!iq", 8, value))
                    elif kind == "i":
                        parts.append(struct.pack("!ii", 4, value))
                    else:
                        parts.append(struct.pack("!i", len(value)))
                        parts.append(value)
                copy.write(b"".join(parts))
            copy.write(struct.pack("!h", -1))


def _columns(rows: Sequence[Sequence[Any]], names: str) -> dict[str, list[Any]]:
    """Rows as one list per column, keyed by the one-letter parameters of an unnest(CAST(:x AS type[]), ...)."""
    return {name: list(column) for name, column in zip(names, zip(*rows, strict=True), strict=True)}


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _vector_binary(vector: np.ndarray) -> bytes:
    """pgvector's binary input: int16 dimensions, int16 unused, then big-endian float32 values."""
    v = np.asarray(vector, dtype=">f4").ravel()
    return struct.pack("!hh", v.shape[0], 0) + v.tobytes()


class DuplicateRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def all_hashes(self) -> Iterator[tuple[int, int, int | None]]:
        """(id, unsigned phash, canonical_id) of every hashed image in id order, streamed."""
        result = self.session.execute(
            text(
                "SELECT id, phash::bigint AS h, canonical_id FROM images WHERE phash IS NOT NULL ORDER BY id"
            ).execution_options(yield_per=50_000)
        )
        for row in result:
            yield int(row.id), int(row.h) & ((1 << 64) - 1), row.canonical_id

    def groups(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Each canonical image with its duplicates and their pHash distance to it, biggest groups first."""
        rows = self.session.execute(
            text(
                "SELECT c.id AS canonical_id, c.original_name, c.source_path, count(d.id) AS duplicates,"
                " array_agg(d.id ORDER BY d.id) AS duplicate_ids,"
                " array_agg(bit_count(c.phash # d.phash) ORDER BY d.id) AS distances"
                " FROM images c JOIN images d ON d.canonical_id = c.id"
                " GROUP BY c.id ORDER BY count(d.id) DESC, c.id LIMIT :n OFFSET :o"
            ),
            {"n": limit, "o": offset},
        )
        return [dict(r._mapping) for r in rows]

    def counts(self) -> dict[str, int]:
        row = self.session.execute(
            text("SELECT count(DISTINCT canonical_id) AS groups, count(canonical_id) AS duplicates FROM images")
        ).one()
        return {"groups": int(row.groups), "duplicates": int(row.duplicates)}
