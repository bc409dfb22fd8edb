"""Per-category HNSW indexes live on category_vectors' partitions (migration 0013): built from that category's
rows only, kept equal to embeddings by a trigger, and an existing catalog's partial indexes are moved there."""

from __future__ import annotations

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import CategoryRepository, ModelRepository, vector_literal
from imsrc.config import Settings
from imsrc.db.engine import downgrade, make_engine, upgrade
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.search.sync import sync_search

from .search_data import brute_force, insert_images, make_catalog

BEFORE = "0012_stage1_calibrated"


def _vectors(session: Session) -> list[tuple[int, int, int | None, str]]:
    return [
        (int(r[0]), int(r[1]), r[2], str(r[3]))
        for r in session.execute(
            text("SELECT model_id, image_id, category_id, embedding::text FROM embeddings ORDER BY 1, 2")
        )
    ]


def _mirror_matches(session: Session) -> set[tuple[int, int, int]]:
    """category_vectors holds exactly the (half-precision) rows of embeddings whose category has a partition."""
    want = session.execute(
        text(
            "SELECT model_id, image_id, category_id, CAST(embedding AS halfvec)::text FROM embeddings"
            " WHERE category_id IS NOT NULL AND imsrc._category_partition(category_id) IS NOT NULL"
        )
    ).all()
    got = session.execute(text("SELECT model_id, image_id, category_id, embedding::text FROM category_vectors")).all()
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    return {(int(r[0]), int(r[1]), int(r[2])) for r in got}


def _index_tables(session: Session, model_id: int) -> dict[str, str]:
    return {
        str(r[0]): str(r[1])
        for r in session.execute(
            text("SELECT indexname, tablename FROM pg_indexes WHERE indexname LIKE :p"),
            {"p": f"ix_embeddings_hv_m{model_id}_c%"},
        )
    }


def test_upgrade_moves_the_indexes_to_partitions_and_keeps_every_vector(create_database) -> None:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_category_vectors")
    upgrade(url, BEFORE)
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            model = ModelRepository(session).register(
                name="upgrade-model", dimension=8, family="test", params={}, supports_text=False
            )
            cats = [CategoryRepository(session).get_or_create(f"up-{i}").id for i in range(3)]
            rng = np.random.default_rng(0)
            vectors = rng.normal(size=(31, 8)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            insert_images(session, model, vectors, [cats[i % 3] for i in range(30)] + [None], salt="up")
            for c in cats[:2]:  # what the code before 0013 built: partial indexes on embeddings
                session.execute(
                    text(
                        f"CREATE INDEX ix_embeddings_hv_m{model.id}_c{c} ON embeddings USING hnsw "
                        f"((embedding::halfvec(8)) halfvec_ip_ops) WITH (m = 32, ef_construction = 80) "
                        f"WHERE model_id = {model.id} AND category_id = {c}"
                    )
                )
            session.commit()
            before = _vectors(session)
            model_id = model.id
        upgrade(url)
        with Session(engine) as session:
            assert _vectors(session) == before  # every vector, category and value as it was
            mirrored = _mirror_matches(session)
            assert {c for _, _, c in mirrored} == set(cats[:2]) and len(mirrored) == 20
            assert _index_tables(session, model_id) == {
                f"ix_embeddings_hv_m{model_id}_c{c}": f"category_vectors_c{c}" for c in cats[:2]
            }
            assert set(NeighbourRepository(session).category_indexes(model_id)) == set(cats[:2])
            sql_indexed = session.execute(text("SELECT category_id FROM imsrc._category_indexes(:m)"), {"m": model_id})
            assert set(sql_indexed.scalars()) == set(cats[:2])
            # The SQL search walks the partitions and finds what an exact scan finds.
            q = vectors[0]
            got = session.execute(
                text("SELECT image_id FROM imsrc._neighbours(:m, 8, CAST(:q AS vector), 5, :c, :c, 'two_stage')"),
                {"m": model_id, "q": vector_literal(q), "c": [cats[0]]},
            ).scalars()
            exact = session.execute(
                text("SELECT image_id FROM imsrc._neighbours(:m, 8, CAST(:q AS vector), 5, :c, :c, 'exact')"),
                {"m": model_id, "q": vector_literal(q), "c": [cats[0]]},
            ).scalars()
            assert list(got) == list(exact)
        downgrade(url, BEFORE)
        with Session(engine) as session:
            assert _vectors(session) == before
            assert session.execute(text("SELECT to_regclass('category_vectors')")).scalar() is None
            assert _index_tables(session, model_id) == {
                f"ix_embeddings_hv_m{model_id}_c{c}": "embeddings" for c in cats[:2]
            }
    finally:
        engine.dispose()


def test_partitions_follow_every_change_of_the_vectors(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=3, per_category=20, dimension=16, name="mirror")
    tuned = settings.model_copy(update={"search_exact_max_rows": 10})
    sync_search(session, tuned, model_id=cat.model.id)
    m, (a, b, c) = cat.model.id, cat.category_ids
    # Built on the partition: the index is on category_vectors_c<id>, which holds that category's rows only.
    assert _index_tables(session, m) == {f"ix_embeddings_hv_m{m}_c{x}": f"category_vectors_c{x}" for x in (a, b, c)}
    assert len(_mirror_matches(session)) == 60
    for x in (a, b, c):
        rows = session.execute(text(f"SELECT DISTINCT category_id FROM category_vectors_c{x}")).scalars().all()
        assert rows == [x]

    first, second, third = (int(i) for i in cat.image_ids[:3])  # all in category a
    new = insert_images(session, cat.model, cat.vectors[:1] * -1, [b], salt="new")  # an upload into b
    session.execute(text("UPDATE images SET category_id = :c WHERE id = :i"), {"c": c, "i": first})  # moved
    session.execute(text("UPDATE images SET category_id = NULL WHERE id = :i"), {"i": second})  # uncategorised
    session.execute(text("DELETE FROM images WHERE id = :i"), {"i": third})  # deleted
    mirrored = _mirror_matches(session)
    assert (m, int(new[0]), b) in mirrored and (m, first, c) in mirrored
    assert not {(m, first, a), (m, second, a), (m, third, a)} & mirrored
    session.execute(
        text("UPDATE embeddings SET embedding = CAST(:v AS vector) WHERE image_id = :i"),
        {"v": vector_literal(-cat.vectors[0]), "i": first},
    )  # a vector replaced
    _mirror_matches(session)
    session.execute(text("DELETE FROM categories WHERE id = :c"), {"c": b})  # its images become uncategorised
    assert not any(x == b for _, _, x in _mirror_matches(session))

    # Search through the partitions' indexes returns what the exact scan returns.
    neighbours = NeighbourRepository(session)
    ids = np.array(
        [
            r[0]
            for r in session.execute(
                text(f"SELECT image_id FROM embeddings WHERE model_id = {m} AND category_id = {c} ORDER BY 1")
            )
        ]
    )
    vecs = np.array(
        [
            np.array(eval(r[0]), dtype=np.float32)
            for r in session.execute(
                text(
                    f"SELECT embedding::text FROM embeddings WHERE model_id = {m} AND category_id = {c}"
                    " ORDER BY image_id"
                )
            )
        ]
    )
    for q in cat.vectors[40:45]:
        hits = neighbours.per_category(m, 16, vector_literal(q), [(c, True)], 5, 100)
        assert [h[0] for h in hits] == brute_force(vecs, ids, q, 5)

    # Below half the threshold the index goes; the partition stays, still kept equal to embeddings.
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 100}), model_id=m)
    assert _index_tables(session, m) == {}
    insert_images(session, cat.model, cat.vectors[1:2] * -1, [a], salt="after")
    assert any(x == a for _, _, x in _mirror_matches(session))
