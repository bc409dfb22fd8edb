"""Uploads in parallel (issue 16, item 3): decoding and the model run before any lock, and the writes take only
narrow locks (catalog.locks: per category for prototypes, a shared one for joining automatic groups, per hash
band for near-duplicates), so an upload into one category does not wait for a writer mid-way through another;
many concurrent uploaders still lose nothing, make no duplicate automatic categories and keep near-duplicates
linked."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import text

from imsrc.catalog import locks
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.imaging import DecodeGate
from imsrc.ingest.uploads import ingest_uploads
from imsrc.search.refresher import DerivedRefresher
from imsrc.search.sync import refresh_derived, sync_search
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


def test_upload_decodes_and_embeds_while_another_writer_holds_a_lock(db: Database, tmp_path: Path) -> None:
    files = [_staged(tmp_path, 700 + i) for i in range(2)]
    gate = CountingGate()
    results: list[object] = []
    with db.session() as setup:  # the category exists, so its id (the lock's key) is known
        held_id = CategoryRepository(setup).get_or_create("held").id
    with db.engine.connect() as holder:  # another writer, mid-way through refreshing that category
        holder.execute(text("SELECT pg_advisory_lock(:c, :k)"), {"c": locks.CATEGORY, "k": held_id})
        worker = threading.Thread(target=lambda: results.extend(ingest_uploads(db, db.settings, files, "held", gate)))
        worker.start()
        for _ in range(600):  # the model loads on first use: allow it a while on a busy machine
            if gate.done == len(files):
                break
            worker.join(0.1)
        assert gate.done == len(files), "the upload did not decode while another writer held the lock"
        worker.join(1.0)
        assert worker.is_alive() and not results  # but it refreshes the category only once the lock is free
        holder.execute(text("SELECT pg_advisory_unlock(:c, :k)"), {"c": locks.CATEGORY, "k": held_id})
        holder.commit()
    worker.join(120)
    assert not worker.is_alive()
    assert [r.status for r in results] == ["new", "new"]  # type: ignore[attr-defined]


def test_an_upload_does_not_wait_for_another_category_s_writer(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One upload stops between its writes and its search sync (its transaction open); an upload into another
    category must finish meanwhile. With the catalog-wide lock (taken before the first write) it waited."""
    from imsrc.ingest import uploads

    paused, release = threading.Event(), threading.Event()
    real_sync = uploads.sync_search

    def sync_pausing_red(session, settings, **kwargs):  # type: ignore[no-untyped-def]
        if not paused.is_set() and CategoryRepository(session).by_name("red") is not None:
            paused.set()
            assert release.wait(300)
        return real_sync(session, settings, **kwargs)

    # The model registered first (the first upload into an empty catalog inserts it, and a second one would wait
    # at its unique name for that insert to commit, as with any row two writers insert at once).
    assert [r.status for r in ingest_uploads(db, db.settings, [_staged(tmp_path, 800)], "green")] == ["new"]
    monkeypatch.setattr(uploads, "sync_search", sync_pausing_red)
    red: list[object] = []
    first = threading.Thread(
        target=lambda: red.extend(ingest_uploads(db, db.settings, [_staged(tmp_path, 801)], "red"))
    )
    first.start()
    try:
        assert paused.wait(300), "the first upload never reached its sync"
        blue = ingest_uploads(db, db.settings, [_staged(tmp_path, 802)], "blue")  # in this thread: must not block
        assert [r.status for r in blue] == ["new"]
        assert first.is_alive() and not red  # the red upload is still open, mid-way
    finally:
        release.set()
        first.join(300)
    assert [r.status for r in red] == ["new"]  # type: ignore[attr-defined]


def _near_copy(seed: int) -> bytes:
    """The picture of make_image(seed, (80, 64)) with one pixel changed: other bytes, the same perceptual hash."""
    img = PILImage.open(io.BytesIO(make_image(seed, size=(80, 64)))).convert("RGB")
    img.putpixel((0, 0), (255 - img.getpixel((0, 0))[0], 0, 0))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("deferred", [False, True], ids=["refreshed-in-upload", "refreshed-in-background"])
def test_fifty_concurrent_uploaders_lose_nothing(db: Database, tmp_path: Path, deferred: bool) -> None:
    # 50 uploads from 10 threads at once: four named categories and uncategorised ones (automatic grouping), one
    # file sent twice, and a near-duplicate pair (one changed pixel) sent at the same moment. deferred: as the
    # server uploads, the calibration and earlier images' labels left to a background refresher.
    refresher = DerivedRefresher(lambda: db, db.settings, delay_s=0.2) if deferred else None
    names = ["red", "green", "blue", "grey", None]
    jobs = [([_staged(tmp_path, 900 + i)], names[i % 5]) for i in range(47)]
    jobs.append(([_staged(tmp_path, 900)], "red"))  # the same bytes as job 0
    near = tmp_path / "near.png"
    near.write_bytes(_near_copy(947))
    jobs.append(([_staged(tmp_path, 947)], "green"))
    jobs.append(([Staged(near.name, near, near.stat().st_size)], "green"))
    gate = DecodeGate(2, 300.0)

    def upload(job: tuple[list[Staged], str | None]) -> list[tuple[str, int | None, int | None]]:
        results = ingest_uploads(db, db.settings, job[0], job[1], gate, refresher=refresher)
        return [(r.status, r.id, r.duplicate_of) for r in results]

    with ThreadPoolExecutor(10) as pool:
        answers = [a for batch in pool.map(upload, jobs) for a in batch]
    if refresher is not None:
        assert refresher.wait_idle(120)
        assert 1 <= refresher.runs < 50  # coalesced: fewer refreshes than uploads
        refresher.close()
    assert [s for s, _, _ in answers].count("failed") == 0
    ids = {i for _, i, _ in answers}
    assert len(ids) == 49 and None not in ids  # the repeated bytes point at the one stored image
    pair = sorted(answers[-2:], key=lambda a: a[0])
    assert [s for s, _, _ in pair] == ["duplicate", "new"] and pair[0][2] == pair[1][1], pair  # linked, once
    with db.session() as session:

        def scalar(sql: str) -> int:
            return int(session.execute(text(sql), {"ids": sorted(ids)}).scalar_one())

        assert scalar("SELECT count(*) FROM images") == 49
        for table in ("thumbnails", "embeddings", "image_blobs"):
            assert scalar(f"SELECT count(DISTINCT image_id) FROM {table} WHERE image_id = ANY(:ids)") == 49, table
        assert scalar("SELECT count(*) FROM (SELECT lower(name) FROM categories GROUP BY 1 HAVING count(*) > 1) d") == 0
        named = session.execute(
            text(
                "SELECT c.name, count(i.id) FROM categories c JOIN images i ON i.category_id = c.id"
                " WHERE NOT c.is_automatic GROUP BY c.name ORDER BY c.name"
            )
        ).all()
        assert [tuple(r) for r in named] == [("blue", 9), ("green", 12), ("grey", 9), ("red", 10)]
        # Every uncategorised upload joined an automatic group, and no group is empty.
        assert scalar("SELECT count(*) FROM images WHERE category_id IS NULL") == 0
        assert (
            scalar("SELECT count(*) FROM images i JOIN categories c ON c.id = i.category_id WHERE c.is_automatic") == 9
        )
        assert (
            scalar(
                "SELECT count(*) FROM categories c WHERE c.is_automatic AND NOT EXISTS"
                " (SELECT 1 FROM images i WHERE i.category_id = c.id)"
            )
            == 0
        )
        # No lost prototype update: each category's mean prototype counts every member.
        stale = session.execute(
            text(
                "SELECT c.name FROM categories c LEFT JOIN category_prototypes p ON p.category_id = c.id"
                " AND p.kind = 'mean' WHERE coalesce(p.member_count, 0)"
                " <> (SELECT count(*) FROM images i WHERE i.category_id = c.id)"
            )
        ).all()
        assert stale == []
        # Labels and calibration are current once the uploads (and, deferred, the refresher) are done: a refresh
        # now changes no predicted label, and stage 1 is calibrated.
        labels = "SELECT id, predicted_category_id, predicted_score FROM images ORDER BY id"
        before = session.execute(text(labels)).all()
        assert sum(row[1] is not None for row in before) == 9  # the automatic groups' members
    with db.session() as session:
        model_id = int(session.execute(text("SELECT id FROM embedding_models")).scalar_one())
        refresh_derived(session, db.settings, model_id=model_id)
        assert session.execute(text(labels)).all() == before
        assert session.execute(text("SELECT count(*) FROM search_state WHERE key LIKE 'stage1:%'")).scalar_one() == 1


def test_embedding_an_image_while_it_is_recategorised_keeps_its_vector_with_it(db: Database) -> None:
    """`imsrc embed` / a new model's re-embedding COPYs the vector of an existing image; the category is filled in
    from images with the COPY's snapshot. A re-categorisation committed before that COPY commits used to move
    nothing (the vector was not visible to it yet) and leave the vector, and its category_vectors copy, under
    the old category for good. Now the images are locked FOR SHARE first: the re-categorisation waits and moves
    it (as on Citus, tests/test_citus.py)."""
    import time

    import numpy as np

    from imsrc.catalog.repository import ModelRepository
    from imsrc.ingest.repository import IngestRepository
    from tests.search_data import insert_images

    with db.session() as session:
        model = ModelRepository(session).register(
            name="recat-model", dimension=8, family="test", params={}, supports_text=False
        )
        old, new = (CategoryRepository(session).get_or_create(n).id for n in ("recat-old", "recat-new"))
        vector = np.eye(8, dtype=np.float32)[0]
        image = int(insert_images(session, model, vector[None, :], [old], salt="recat")[0])
        session.execute(text("DELETE FROM embeddings WHERE image_id = :i"), {"i": image})  # lacks its vector
        for c in (old, new):  # both categories have their copy of the vectors (0013)
            session.execute(text("SELECT imsrc._create_category_partition(:c)"), {"c": c})
        session.commit()
        model_id = int(model.id)
    moved: list[float] = []

    def recategorise() -> None:
        with db.session() as other:
            started = time.monotonic()
            other.execute(text("UPDATE images SET category_id = :c WHERE id = :i"), {"c": new, "i": image})
            other.commit()
            moved.append(time.monotonic() - started)

    with db.session() as session:
        IngestRepository(session).copy_embeddings(model_id, [(image, vector)])
        mover = threading.Thread(target=recategorise)
        mover.start()
        time.sleep(1.0)  # the UPDATE is sent while the embedding's transaction is still open
        waited = not moved
        session.commit()
    mover.join(60)
    assert moved and waited, "the re-categorisation did not wait for the embedding's transaction"
    with db.session() as session:
        rows = session.execute(
            text(
                "SELECT e.category_id, i.category_id FROM embeddings e JOIN images i ON i.id = e.image_id"
                " WHERE e.image_id = :i"
            ),
            {"i": image},
        ).all()
        assert [tuple(r) for r in rows] == [(new, new)]
        copies = session.execute(text("SELECT category_id FROM category_vectors WHERE image_id = :i"), {"i": image})
        assert copies.scalars().all() == [new]


def test_concurrent_uploads_while_categories_get_their_partitions(db: Database, tmp_path: Path) -> None:
    # A tiny index threshold: the uploads' syncs create per-category partitions and indexes (migration 0013) while
    # other uploads write vectors into the same categories. Nothing fails, and each partition equals embeddings.
    tuned = db.settings.model_copy(update={"search_exact_max_rows": 2})
    names = ["red", "green", "blue", "grey"]
    jobs = [([_staged(tmp_path, 1200 + i)], names[i % 4]) for i in range(20)]
    gate = DecodeGate(2, 300.0)

    def upload(job: tuple[list[Staged], str | None]) -> list[str]:
        return [r.status for r in ingest_uploads(db, tuned, job[0], job[1], gate)]

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for batch in pool.map(upload, jobs) for s in batch]
    assert statuses.count("new") == 20
    with db.session() as session:
        # An index whose table was busy with another upload's writes is built at a later sync (as here).
        sync_search(session, tuned)
    with db.session() as session:
        want = session.execute(
            text(
                "SELECT model_id, image_id, category_id, CAST(embedding AS halfvec)::text FROM embeddings"
                " WHERE category_id IS NOT NULL AND imsrc._category_partition(category_id) IS NOT NULL"
            )
        ).all()
        got = session.execute(text("SELECT model_id, image_id, category_id, embedding::text FROM category_vectors"))
        assert sorted(map(tuple, got.all())) == sorted(map(tuple, want)) and len(want) == 20
        indexed = session.execute(
            text(
                "SELECT c.name FROM pg_indexes x JOIN categories c ON x.tablename = 'category_vectors_c' || c.id"
                " WHERE x.indexname LIKE 'ix_embeddings_hv_%' ORDER BY 1"
            )
        ).scalars()
        assert list(indexed) == sorted(names)


def test_two_models_building_indexes_in_the_same_new_categories_share_their_partitions(db: Database) -> None:
    """Per-category indexes live on one partition of category_vectors per category (migration 0013), created with
    the category's first index; the index lock is per model. Two models' builds of the same new categories at once
    (uploads for the active model while `imsrc embed` indexes another) both saw no partition and both created it:
    the second failed with a unique violation in pg_type, losing its unit of work. Now one transaction at a time
    makes partitions; the other leaves those categories for its next sync (as it does for a busy table)."""
    import time

    import numpy as np

    from imsrc.catalog.repository import ModelRepository
    from imsrc.search.pg_queries import NeighbourRepository
    from tests.search_data import insert_images

    with db.session() as session:
        models = [
            ModelRepository(session).register(
                name=f"twin-{i}", dimension=8, family="test", params={}, supports_text=False
            )
            for i in range(2)
        ]
        cats = sorted(CategoryRepository(session).get_or_create(f"twin-cat-{i}").id for i in range(2))
        rng = np.random.default_rng(3)
        vectors = rng.normal(size=(20, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = insert_images(session, models[0], vectors, [cats[i % 2] for i in range(20)], salt="twin")
        session.execute(
            text(
                "INSERT INTO embeddings (model_id, image_id, embedding) SELECT :m, image_id, embedding FROM embeddings"
            ),
            {"m": models[1].id},
        )
        session.commit()
        model_ids = [int(m.id) for m in models]
    errors: list[str] = []
    start = threading.Barrier(2)

    left: list[tuple[int, int]] = []

    def build(model_id: int) -> None:
        try:
            with db.session() as session:
                start.wait(10)
                for c in cats:  # in id order, as search sync does
                    if not NeighbourRepository(session).create_category_index(model_id, 8, c):
                        left.append((model_id, c))
                time.sleep(0.5)  # the other build reaches the same categories before this one commits
                session.commit()
        except Exception as exc:  # the assertion below names it
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=build, args=(m,)) for m in model_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with db.session() as session:  # the next sync builds what was left
        assert all(NeighbourRepository(session).create_category_index(m, 8, c) for m, c in left)
        session.commit()
    with db.session() as session:
        tables = {
            str(r[0]): str(r[1])
            for r in session.execute(
                text("SELECT indexname, tablename FROM pg_indexes WHERE indexname LIKE 'ix_embeddings_hv_%'")
            )
        }
        assert tables == {f"ix_embeddings_hv_m{m}_c{c}": f"category_vectors_c{c}" for m in model_ids for c in cats}
        copies = session.execute(text("SELECT model_id, count(*) FROM category_vectors GROUP BY 1 ORDER BY 1")).all()
        assert [tuple(r) for r in copies] == [(m, len(ids)) for m in model_ids]
