"""The schema as Alembic builds it: round trip, models side by side, category sync, storage."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.db.engine import current_revision, downgrade, head_revision, make_engine, upgrade


def test_migration_round_trip_on_empty_database(create_database) -> None:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_roundtrip")
    engine = make_engine(url)
    try:
        upgrade(url)
        assert current_revision(engine) == head_revision(url)
        downgrade(url, "base")
        with engine.connect() as conn:
            tables = conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                    " AND table_name <> 'alembic_version'"
                )
            ).scalar()
        assert tables == 0
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM catalog_images")).scalar() == 0
            assert conn.execute(text("SELECT extversion FROM pg_extension WHERE extname='vector'")).scalar()
    finally:
        engine.dispose()


def _insert_image(session: Session, n: int, category_id: int | None = None) -> int:
    return int(
        session.execute(
            text(
                "INSERT INTO images (sha256, width, height, format, byte_size, category_id)"
                " VALUES (:s, 10, 10, 'PNG', 100, :c) RETURNING id"
            ),
            {"s": n.to_bytes(32, "big"), "c": category_id},
        ).scalar_one()
    )


def _vec(values: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.6f}" for v in values) + "]"


def test_two_models_of_different_dimensions_live_side_by_side(session: Session) -> None:
    models = ModelRepository(session)
    small = models.register(name="test-a", dimension=4, family="test", params={}, supports_text=False)
    image_id = _insert_image(session, 1)
    session.execute(
        text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, :e)"),
        {"m": small.id, "i": image_id, "e": _vec(np.array([1, 0, 0, 0]))},
    )
    # Adding a second, wider model keeps the first one's vectors and gives it its own HNSW index.
    wide = models.register(name="test-b", dimension=2048, family="test", params={"k": 1}, supports_text=True)
    session.execute(
        text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, :e)"),
        {"m": wide.id, "i": image_id, "e": _vec(np.ones(2048) / np.sqrt(2048))},
    )
    rows = session.execute(
        text("SELECT model, dimension FROM catalog_embeddings WHERE image_id = :i ORDER BY 2"), {"i": image_id}
    ).all()
    assert [(r.model, r.dimension) for r in rows] == [("test-a", 4), ("test-b", 2048)]
    indexes = session.execute(
        text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'embeddings' AND indexdef LIKE '%hnsw%'")
    ).all()
    defs = {r.indexname: r.indexdef for r in indexes}
    assert "halfvec(4)" in defs[f"ix_embeddings_hnsw_m{small.id}"]  # half precision at every dimension
    assert "halfvec(2048)" in defs[f"ix_embeddings_hnsw_m{wide.id}"]
    assert models.register(name="test-a", dimension=4, family="test", params={}, supports_text=False).id == small.id
    views = session.execute(text("SELECT embedded_models FROM catalog_images WHERE id = :i"), {"i": image_id})
    assert views.scalar_one() == ["test-a", "test-b"]
    # Removing a model removes only its vectors.
    models.remove(wide)
    assert (
        session.execute(text("SELECT count(*) FROM embeddings WHERE image_id = :i"), {"i": image_id}).scalar_one() == 1
    )


def test_embedding_category_follows_image_category(session: Session) -> None:
    cats = CategoryRepository(session)
    shoes, bags = cats.get_or_create("Shoes"), cats.get_or_create("Bags")
    model = ModelRepository(session).register(name="test-sync", dimension=3, family="t", params={}, supports_text=False)
    image_id = _insert_image(session, 2, shoes.id)
    session.execute(
        text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, '[1,0,0]')"),
        {"m": model.id, "i": image_id},
    )
    get = text("SELECT category_id FROM embeddings WHERE image_id = :i")
    assert session.execute(get, {"i": image_id}).scalar_one() == shoes.id
    session.execute(text("UPDATE images SET category_id = :c WHERE id = :i"), {"c": bags.id, "i": image_id})
    assert session.execute(get, {"i": image_id}).scalar_one() == bags.id


def test_category_names_are_unique_ignoring_case(session: Session) -> None:
    cats = CategoryRepository(session)
    first = cats.get_or_create("Sneakers")
    assert cats.get_or_create("  sneakers ").id == first.id
    with pytest.raises(IntegrityError), session.begin_nested():
        session.execute(text("INSERT INTO categories (name) VALUES ('SNEAKERS')"))


def test_constraints_reject_bad_rows(session: Session) -> None:
    with pytest.raises(IntegrityError), session.begin_nested():
        session.execute(
            text("INSERT INTO images (sha256, width, height, format, byte_size) VALUES ('\\x00', 10, 10, 'PNG', 1)")
        )
    with pytest.raises(IntegrityError), session.begin_nested():
        session.execute(
            text("INSERT INTO images (sha256, width, height, format, byte_size) VALUES (:s, 0, 10, 'PNG', 1)"),
            {"s": bytes(32)},
        )


def test_vectors_stay_out_of_toast(session: Session) -> None:
    storage = session.execute(
        text("SELECT attstorage FROM pg_attribute WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding'")
    ).scalar_one()
    assert storage == "m"  # MAIN: in the row unless it cannot fit a page


def test_only_one_active_model(session: Session) -> None:
    models = ModelRepository(session)
    a = models.register(name="act-a", dimension=3, family="t", params={}, supports_text=False)
    b = models.register(name="act-b", dimension=3, family="t", params={}, supports_text=False)
    models.set_active(a)
    models.set_active(b)
    assert models.active() is not None and models.active().id == b.id  # type: ignore[union-attr]
    assert session.execute(text("SELECT count(*) FROM embedding_models WHERE is_active")).scalar_one() == 1
