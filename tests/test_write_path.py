"""The write path (issue 13, and the write-path items of issue 12): bugs found while walking an upload, an
`imsrc embed` and a model removal from the entry point to their rows. Each test failed on the code before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.ingest.embed_missing import embed_missing
from imsrc.ingest.pipeline import run_index_job
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.search.sync import sync_search
from imsrc.services.models import ModelService
from tests.helpers import run_cli
from tests.ingest_support import TEST_MODEL, make_image, open_test_database, write
from tests.search_data import make_catalog

# The tiny test architecture and seed under another name: the same pixels give the same vectors.
TWIN = "open_clip:imsrc-tiny-test:none"


@pytest.fixture()
def split_db(create_database, scratch: Path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    # prototype_min_gain 0: any category of 20+ members is split into k-means prototypes.
    database = open_test_database(create_database("imsrc_write"), scratch / "data", prototype_min_gain=0.0)
    yield database
    database.dispose()


def _prototypes(db: Database, model: str) -> list[tuple[str, str, int, int]]:
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.name, p.kind, p.ordinal, p.member_count FROM category_prototypes p"
            " JOIN categories c ON c.id = p.category_id JOIN embedding_models m ON m.id = p.model_id"
            " WHERE m.name = :n AND p.kind IN ('mean', 'cluster') ORDER BY 1, 2, 3"), {"n": model}).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_embed_builds_the_new_models_cluster_prototypes(split_db: Database, scratch: Path) -> None:
    # embed_missing used to compute the new model's means before sync_search, which then found no category
    # stale and never built its k-means prototypes: the second model searched with means only.
    for i in range(24):
        write(scratch / "shoes" / f"s{i}.png", make_image(700 + i, (64, 48)))
    run_index_job(split_db, get_embedder(TEST_MODEL), [str(scratch / "shoes")], category="shoes", workers=1)
    first = _prototypes(split_db, TEST_MODEL)
    assert [k for _, k, _, _ in first].count("cluster") >= 2  # the catalog's first model has them

    summary = embed_missing(split_db, get_embedder(TWIN), workers=1, batch_size=8)
    assert summary.embedded == 24
    assert _prototypes(split_db, TWIN) == first  # same vectors, same prototypes, clusters included


def test_removing_a_model_drops_its_per_category_indexes(session: Session, settings: Settings) -> None:
    # ModelRepository.remove dropped only the catalog-wide HNSW index; the per-category ones stayed behind.
    cat = make_catalog(session, n_categories=2, per_category=30, dimension=16, name="removed-model")
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 10}), model_id=cat.model.id)
    neighbours = NeighbourRepository(session)
    assert set(neighbours.category_indexes(cat.model.id)) == set(cat.category_ids)

    models = ModelRepository(session)
    models.set_active(models.register(name="kept-model", dimension=16, family="test", params={}, supports_text=False))
    ModelService(session, settings).remove(cat.model.name)
    left = session.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'embeddings'"
                                " AND indexname ~ :p"), {"p": f"_m{cat.model.id}(_|$)"}).scalars().all()
    assert left == []


def test_cli_rename_goes_through_the_category_service(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    # `imsrc categories rename` wrote the name itself: a taken name was another error than the API's 409
    # conflict, and search never heard of the new name (no text prototype for a CLIP model).
    db = open_test_database(create_database("imsrc_rename"), scratch / "data")
    with db.session() as s:
        models = ModelRepository(s)
        models.set_active(models.register(name=TEST_MODEL, dimension=64, family="open_clip", params={},
                                          supports_text=True))
        cats = CategoryRepository(s)
        cat_id = cats.create("cats").id
        cats.create("dogs")
    env = {"IMSRC_DATABASE_URL": db.url, "IMSRC_DATA_DIR": str(scratch / "cli"), "IMSRC_MODEL": TEST_MODEL}

    taken = run_cli("categories", "rename", "cats", "DOGS", env=env)
    assert taken.returncode == 1 and "a category named 'DOGS' already exists" in taken.stderr

    done = run_cli("categories", "rename", str(cat_id), "kittens", env=env)
    assert done.returncode == 0, done.stderr
    with db.engine.connect() as conn:
        name = conn.execute(text("SELECT name FROM categories WHERE id = :c"), {"c": cat_id}).scalar_one()
        text_protos = conn.execute(text("SELECT count(*) FROM category_prototypes WHERE category_id = :c"
                                        " AND kind = 'text'"), {"c": cat_id}).scalar_one()
    db.dispose()
    assert (name, text_protos) == ("kittens", 1)
