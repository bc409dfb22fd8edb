"""The upload path (ingest_bytes), prototypes in SQL, duplicate regrouping, and the migration's grants."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.config import Settings
from imsrc.embeddings.registry import get_embedder
from imsrc.formats import image_extensions
from imsrc.ingest.duplicates import recompute_duplicates
from imsrc.ingest.phash import PhashIndex
from imsrc.ingest.repository import JobRepository
from imsrc.ingest.service import ingest_bytes
from tests.ingest_support import TEST_MODEL, make_image, reencode


def test_ingest_bytes_stores_links_and_reports_failures(session: Session, settings: Settings) -> None:
    embedder = get_embedder(TEST_MODEL)
    good = make_image(301, (200, 150), "PNG")
    other = make_image(302, (200, 150), "JPEG")
    outcomes = ingest_bytes(
        session,
        embedder,
        [("good.png", good), ("same.png", good), ("broken.gif", b"GIF89a!"), ("other.jpg", other)],
        settings=settings,
        category="Uploads",
    )
    got = [(o.key, o.outcome) for o in outcomes]
    assert got == [("good.png", "new"), ("same.png", "linked"), ("broken.gif", "failed"), ("other.jpg", "new")]
    assert outcomes[0].image_id == outcomes[1].image_id and outcomes[0].image_id is not None
    assert outcomes[2].reason == "corrupt or truncated image data: starts like a GIF file but cannot be decoded"
    rows = session.execute(
        text(
            "SELECT i.id, b.data, i.original_name, i.source_path, c.name FROM images i JOIN image_blobs b"
            " ON b.image_id = i.id JOIN categories c ON c.id = i.category_id WHERE i.id = ANY(:i) ORDER BY i.id"
        ),
        {"i": [outcomes[0].image_id, outcomes[3].image_id]},
    ).all()
    assert [(bytes(r.data), r.original_name, r.source_path, r.name) for r in rows] == [
        (good, "good.png", None, "Uploads"),
        (other, "other.jpg", None, "Uploads"),
    ]
    # The stored vector is the model's vector for the decoded image; the category prototype exists.
    vec = session.execute(
        text("SELECT embedding::text FROM embeddings WHERE image_id = :i"), {"i": outcomes[0].image_id}
    ).scalar_one()
    assert np.linalg.norm(np.array(vec.strip("[]").split(","), float)) > 0.999
    proto = session.execute(
        text(
            "SELECT member_count FROM category_prototypes p JOIN categories c"
            " ON c.id = p.category_id WHERE c.name = 'Uploads' AND p.kind = 'mean'"
        )
    ).scalar_one()
    assert proto == 2
    # Uploading the same bytes again adds nothing; a re-encode is a near-duplicate of the first.
    again = ingest_bytes(
        session, embedder, [("again.png", good), ("near.jpg", reencode(good, "JPEG", quality=80))], settings=settings
    )
    assert (again[0].outcome, again[0].image_id) == ("linked", outcomes[0].image_id)
    assert again[1].outcome == "duplicate" and again[1].canonical_id == outcomes[0].image_id
    too_big = ingest_bytes(
        session, embedder, [("big.png", good)], settings=settings.model_copy(update={"max_upload_bytes": 10})
    )
    assert too_big[0].outcome == "failed" and "IMSRC_MAX_UPLOAD_BYTES" in (too_big[0].reason or "")


def _vec(values: list[float]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def test_recompute_means_is_the_normalised_average(session: Session) -> None:
    cats = CategoryRepository(session)
    shoes, empty = cats.get_or_create("Shoes-proto"), cats.get_or_create("Empty-proto")
    model = ModelRepository(session).register(
        name="proto-test", dimension=3, family="t", params={}, supports_text=False
    )
    vectors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]]
    for n, v in enumerate(vectors):
        image_id = session.execute(
            text(
                "INSERT INTO images (sha256, width, height, format, byte_size, category_id)"
                " VALUES (:s, 1, 1, 'PNG', 1, :c) RETURNING id"
            ),
            {"s": (9000 + n).to_bytes(32, "big"), "c": shoes.id},
        ).scalar_one()
        session.execute(
            text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, :e)"),
            {"m": model.id, "i": image_id, "e": _vec(v)},
        )
    session.execute(
        text(
            "INSERT INTO category_prototypes (category_id, model_id, kind, ordinal, vector)"
            " VALUES (:c, :m, 'mean', 0, '[1,0,0]')"
        ),
        {"c": empty.id, "m": model.id},
    )
    repo = PrototypeRepository(session)
    assert repo.recompute_means([shoes.id, empty.id], model.id) == 1
    row = session.execute(
        text(
            "SELECT vector::text, member_count FROM category_prototypes"
            " WHERE category_id = :c AND model_id = :m AND kind = 'mean' AND ordinal = 0"
        ),
        {"c": shoes.id, "m": model.id},
    ).one()
    expected = np.mean(np.array(vectors), axis=0)
    expected /= np.linalg.norm(expected)
    assert np.allclose(np.array(row[0].strip("[]").split(","), float), expected, atol=1e-6) and row[1] == 3
    # A category with no members loses its stale mean prototype.
    assert (
        session.execute(
            text("SELECT count(*) FROM category_prototypes WHERE category_id = :c"), {"c": empty.id}
        ).scalar_one()
        == 0
    )


def test_regrouping_duplicates_follows_the_threshold(session: Session) -> None:
    # Hashes: A; B at distance 3 from A; C at distance 3 from B but 6 from A.
    a, b, c = 0, 0b111, 0b111111
    ids = []
    for n, h in enumerate([a, b, c]):
        ids.append(
            session.execute(
                text(
                    "INSERT INTO images (sha256, phash, width, height, format, byte_size)"
                    " VALUES (:s, CAST(:h AS bigint)::bit(64), 1, 1, 'PNG', 1) RETURNING id"
                ),
                {"s": (7000 + n).to_bytes(32, "big"), "h": h},
            ).scalar_one()
        )
    session.execute(text("UPDATE images SET canonical_id = NULL WHERE canonical_id IS NOT NULL"))
    recompute_duplicates(session, 4)
    canon = dict(session.execute(text("SELECT id, canonical_id FROM images WHERE id = ANY(:i)"), {"i": ids}).all())
    # Stars, not chains: C is not within 4 of the canonical A, so it starts its own group.
    assert canon == {ids[0]: None, ids[1]: ids[0], ids[2]: None}
    recompute_duplicates(session, 6)
    canon = dict(session.execute(text("SELECT id, canonical_id FROM images WHERE id = ANY(:i)"), {"i": ids}).all())
    assert canon == {ids[0]: None, ids[1]: ids[0], ids[2]: ids[0]}
    recompute_duplicates(session, 0)
    assert (
        session.execute(
            text("SELECT count(*) FROM images WHERE id = ANY(:i) AND canonical_id IS NOT NULL"), {"i": ids}
        ).scalar_one()
        == 0
    )


def test_phash_index_picks_the_earliest_within_threshold() -> None:
    index = PhashIndex(2, [(5, 0b1), (3, 0b1111), (9, 0)])
    assert index.match(0b11) == 3  # ids 3 (distance 2), 5 (1) and 9 (2) all match: the earliest wins
    assert index.match(0b1111_0000) is None
    for i in range(3000):  # growth keeps earlier entries
        index.add(100 + i, (1 << 40) | i)
    assert index.match(0) == 5
    assert index.match((1 << 40) | 2999) == 100 + min(i for i in range(3000) if (i ^ 2999).bit_count() <= 2)


def test_reader_role_can_read_the_ingest_tables(session: Session) -> None:
    for table in ("ingest_jobs", "ingest_files", "image_sources", "catalog_jobs", "catalog_image_sources"):
        assert session.execute(
            text("SELECT has_table_privilege('imsrc_reader', :t, 'SELECT')"), {"t": table}
        ).scalar_one(), table


def test_failed_files_query(session: Session) -> None:
    query = (Path(__file__).resolve().parents[1] / "db" / "queries" / "06_failed_files.sql").read_text()
    jobs = JobRepository(session)
    old = jobs.create(kind="index", job_key="q-old", paths=["/x"], options={}, model_id=None, model_name=None)
    new = jobs.create(kind="index", job_key="q-new", paths=["/y"], options={}, model_id=None, model_name=None)
    jobs.record_files(old, [("/x/a.jpg", "failed", "old reason", None, None, None)])
    jobs.record_files(
        new, [("/y/b.jpg", "failed", "empty file (0 bytes)", None, None, 0), ("/y/c.jpg", "new", None, None, None, 10)]
    )
    assert [tuple(r) for r in session.execute(text(query))] == [("/y/b.jpg", "empty file (0 bytes)")]


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_is_ingested_where_pillow_decodes_it(session: Session, settings: Settings) -> None:
    assert ".avif" in image_extensions()
    data = make_image(311, (64, 48), "AVIF")
    [outcome] = ingest_bytes(session, get_embedder(TEST_MODEL), [("photo.avif", data)], settings=settings)
    assert outcome.outcome == "new"
    row = session.execute(text("SELECT format, width, height FROM images WHERE id = :i"), {"i": outcome.image_id}).one()
    assert tuple(row) == ("AVIF", 64, 48)


def test_exif_orientation_is_applied(session: Session, settings: Settings) -> None:
    img = Image.open(io.BytesIO(make_image(312, (80, 40), "PNG"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    [outcome] = ingest_bytes(session, get_embedder(TEST_MODEL), [("rotated.jpg", buf.getvalue())], settings=settings)
    size = session.execute(
        text(
            "SELECT i.width, i.height, t.width, t.height FROM images i JOIN thumbnails t"
            " ON t.image_id = i.id WHERE i.id = :i"
        ),
        {"i": outcome.image_id},
    ).one()
    assert tuple(size) == (40, 80, 40, 80)  # stored upright: the 80x40 pixels display as 40x80
