"""Uploads in parallel (issue 16, item 3): decoding and the model run before the catalog write lock, so an upload
is not queued behind another's writes for its slow part; the writes themselves and the search sync still take the
lock, so many concurrent uploaders lose nothing and make no duplicate automatic categories."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from imsrc.catalog.repository import CATALOG_WRITE_LOCK
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.imaging import DecodeGate
from imsrc.ingest.uploads import ingest_uploads
from tests.fixtures.database import fresh_database
from tests.helpers import make_image
from tests.ingest_support import TEST_MODEL


@dataclass
class Staged:
    filename: str
    path: Path
    size: int


def _staged(folder: Path, seed: int) -> Staged:
    data = make_image(seed, size=(80, 64))
    path = folder / f"{seed}.png"
    path.write_bytes(data)
    return Staged(path.name, path, len(data))


class CountingGate(DecodeGate):
    """The server's decode gate, counting finished decodes (how the test sees an upload's progress)."""

    def __init__(self) -> None:
        super().__init__(4, 60.0)
        self.done = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with super().slot():
            yield
        self.done += 1


@pytest.fixture
def db(create_database, settings: Settings) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    database = fresh_database(create_database, settings, "imsrc_locking", model=TEST_MODEL)
    yield database
    database.dispose()


def test_upload_decodes_and_embeds_while_another_writer_holds_the_lock(db: Database, tmp_path: Path) -> None:
    files = [_staged(tmp_path, 700 + i) for i in range(2)]
    gate = CountingGate()
    results: list[object] = []
    with db.engine.connect() as holder:  # another writer, mid-way through its unit of work
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": CATALOG_WRITE_LOCK})
        worker = threading.Thread(target=lambda: results.extend(ingest_uploads(db, db.settings, files, "held",
                                                                               gate)))
        worker.start()
        for _ in range(600):  # the model loads on first use: allow it a while on a busy machine
            if gate.done == len(files):
                break
            worker.join(0.1)
        # Before the change the upload waited for the lock before decoding anything.
        assert gate.done == len(files), "the upload did not decode while another writer held the lock"
        worker.join(1.0)
        assert worker.is_alive() and not results  # but it writes only once the lock is free
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": CATALOG_WRITE_LOCK})
        holder.commit()
    worker.join(120)
    assert not worker.is_alive()
    assert [r.status for r in results] == ["new", "new"]  # type: ignore[attr-defined]


def test_many_concurrent_uploaders_lose_nothing(db: Database, tmp_path: Path) -> None:
    # 24 uploads from 8 threads: three named categories and uncategorised ones (automatic grouping), one file
    # sent twice at once.
    jobs = [([_staged(tmp_path, 900 + i)], ["red", "green", "blue", None][i % 4]) for i in range(23)]
    jobs.append(([_staged(tmp_path, 900)], "red"))  # the same bytes as job 0, concurrently
    gate = DecodeGate(2, 300.0)

    def upload(job: tuple[list[Staged], str | None]) -> list[tuple[str, int | None]]:
        return [(r.status, r.id) for r in ingest_uploads(db, db.settings, job[0], job[1], gate)]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(upload, jobs) for a in batch]
    assert sorted(s for s, _ in answers).count("failed") == 0
    ids = {i for _, i in answers}
    assert len(ids) == 23 and None not in ids  # the repeated bytes point at the one stored image
    with db.session() as session:
        def scalar(sql: str) -> int:
            return int(session.execute(text(sql), {"ids": sorted(ids)}).scalar_one())

        assert scalar("SELECT count(*) FROM images") == 23
        for table in ("thumbnails", "embeddings", "image_blobs"):
            assert scalar(f"SELECT count(DISTINCT image_id) FROM {table} WHERE image_id = ANY(:ids)") == 23, table
        assert scalar("SELECT count(*) FROM (SELECT lower(name) FROM categories GROUP BY 1 HAVING count(*) > 1) d") \
            == 0
        named = session.execute(text(
            "SELECT c.name, count(i.id) FROM categories c JOIN images i ON i.category_id = c.id"
            " WHERE NOT c.is_automatic GROUP BY c.name ORDER BY c.name")).all()
        assert [tuple(r) for r in named] == [("blue", 6), ("green", 6), ("red", 6)]
        # No lost prototype update: each category's mean prototype counts every member.
        stale = session.execute(text(
            "SELECT c.name FROM categories c JOIN category_prototypes p ON p.category_id = c.id AND p.kind = 'mean'"
            " WHERE p.member_count <> (SELECT count(*) FROM images i WHERE i.category_id = c.id)")).all()
        assert stale == []
