"""Prototypes, automatic categories, zero-shot text prototypes and predicted labels."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.embeddings import get_embedder
from imsrc.search.kmeans import normalise
from imsrc.search.prototypes import compute_prototypes
from imsrc.search.repository import STATE_KEY_PREFIX, SearchStateRepository, VectorRepository
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime, SearchService
from imsrc.search.stage1 import PrototypeCache
from imsrc.search.sync import only, sync_search
from tests.search_data import gaussian_mixture, insert_images, make_catalog


def _rename(session: Session, category_id: int, name: str) -> None:
    repo = CategoryRepository(session)
    repo.update(repo.get(category_id), name=name)


def test_tight_category_keeps_one_prototype_spread_one_gets_several() -> None:
    tight, _, _ = gaussian_mixture(1, 200, 32, spread=0.3)
    assert [r.kind for r in compute_prototypes(tight, max_prototypes=4, min_gain=0.02)] == ["mean"]
    spread, _labels, _ = gaussian_mixture(3, 100, 32, spread=0.3, seed=4)  # three groups under one name
    rows = compute_prototypes(spread, max_prototypes=4, min_gain=0.02)
    clusters = [r for r in rows if r.kind == "cluster"]
    assert len(clusters) == 3 and sorted(r.member_count for r in clusters) == [100, 100, 100]
    assert rows[0].kind == "mean" and rows[0].member_count == 300
    assert np.allclose(np.linalg.norm(rows[0].vector), 1.0, atol=1e-5)
    capped = compute_prototypes(spread, max_prototypes=2, min_gain=0.02)
    assert len([r for r in capped if r.kind == "cluster"]) == 2
    few = compute_prototypes(spread[:15], max_prototypes=4, min_gain=0.02)
    assert len(few) == 1  # fewer than 10 members per extra centre: no split


def test_prototypes_follow_ingest_deletes_and_moves(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=3, per_category=40, dimension=16)
    sync_search(session, settings, model_id=cat.model.id)
    protos = PrototypeRepository(session)
    counts = protos.member_counts(cat.model.id)
    assert [counts[c] for c in cat.category_ids] == [40, 40, 40]
    mean0 = next(p for p in protos.load(cat.model.id, ("mean",)) if p.category_id == cat.category_ids[0])
    assert np.allclose(mean0.vector, normalise(cat.vectors[cat.labels == 0].sum(0)), atol=1e-5)
    # Plain SQL moves 5 images and deletes 3; the next sync finds exactly the stale categories.
    moved = cat.image_ids[cat.labels == 0][:5].tolist()
    session.execute(
        text("UPDATE images SET category_id = :c WHERE id = ANY(:i)"), {"c": cat.category_ids[1], "i": moved}
    )
    session.execute(text("DELETE FROM images WHERE id = ANY(:i)"), {"i": cat.image_ids[cat.labels == 2][:3].tolist()})
    report = sync_search(session, settings, model_id=cat.model.id)
    assert sorted(report.prototypes_refreshed) == sorted(cat.category_ids)
    counts = protos.member_counts(cat.model.id)
    assert [counts[c] for c in cat.category_ids] == [35, 45, 37]
    again = sync_search(session, settings, model_id=cat.model.id)
    assert again.prototypes_refreshed == []  # nothing changed: nothing recomputed


def test_stage1_matrix_reloads_only_when_prototypes_change(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=3, per_category=30, dimension=16)
    sync_search(session, settings, model_id=cat.model.id)
    cache = PrototypeCache()
    first = cache.get(session, cat.model.id)
    assert cache.get(session, cat.model.id) is first and cache.loads == 1
    _rename(session, cat.category_ids[0], "renamed-zero")
    second = cache.get(session, cat.model.id)
    assert cache.loads == 2 and second.names[cat.category_ids[0]] == "renamed-zero"


def test_uncategorised_images_are_grouped_and_reachable(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=4, per_category=30, dimension=16, uncategorised=120, seed=2)
    report = sync_search(session, settings, model_id=cat.model.id)
    auto = CategoryRepository(session).automatic_ids()
    assert len(auto) == len(report.automatic_touched) >= 2
    left = session.execute(text("SELECT count(*) FROM images WHERE category_id IS NULL")).scalar()
    assert left == 0
    # Every uncategorised image is found by two-stage search with its own vector.
    service = SearchService(session, SearchRuntime.create(settings, embedder_factory=lambda n: None))
    extra = np.flatnonzero(cat.labels < 0)
    for i in extra[:15]:
        got = service.search_vector(cat.model, cat.vectors[i], SearchOptions(k=1, categories=2))
        assert got.results[0].id == cat.image_ids[i]
    # A few newcomers join existing groups; growth past the threshold regroups everything.
    new_ids = insert_images(session, cat.model, cat.vectors[extra[:10]] * 0.99 + 0.01, [None] * 10, salt="n")
    small = sync_search(session, settings, model_id=cat.model.id)
    assert set(small.automatic_touched) <= set(auto)
    assert (
        session.execute(
            text("SELECT count(*) FROM images WHERE id = ANY(:i) AND category_id = ANY(:a)"),
            {"i": new_ids.tolist(), "a": auto},
        ).scalar()
        == 10
    )
    insert_images(session, cat.model, cat.vectors[extra] * 0.98 + 0.02, [None] * len(extra), salt="m")
    big = sync_search(session, settings, model_id=cat.model.id)
    assert set(big.automatic_touched).isdisjoint(auto)  # regrouped: new automatic categories


def test_automatic_category_description_stays_true_as_images_join(session: Session, settings: Settings) -> None:
    # The web page shows "N images — <description>": a description that counted the members when the group
    # was made ("Automatic group of 8 ...") contradicted the live count once newcomers joined the group.
    cat = make_catalog(session, n_categories=2, per_category=20, dimension=16, uncategorised=60, seed=5)
    sync_search(session, settings, model_id=cat.model.id)
    extra = np.flatnonzero(cat.labels < 0)
    insert_images(session, cat.model, cat.vectors[extra[:6]] * 0.99 + 0.01, [None] * 6, salt="j")
    joined = sync_search(session, settings, model_id=cat.model.id)
    assert joined.automatic_touched  # the newcomers joined existing groups (no regroup)
    rows = session.execute(
        text(
            "SELECT c.description, count(i.id) FROM categories c JOIN images i ON i.category_id = c.id"
            " WHERE c.is_automatic GROUP BY c.id, c.description"
        )
    ).all()
    assert rows
    for description, members in rows:
        assert "automatic group" in description.lower()
        stated = [int(n) for n in re.findall(r"\d+", description)]
        assert all(n == members for n in stated), (description, members)


def test_renaming_an_automatic_category_makes_it_real(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=2, per_category=20, dimension=16, uncategorised=60, seed=5)
    sync_search(session, settings, model_id=cat.model.id)
    repo = CategoryRepository(session)
    first = repo.automatic_ids()[0]
    repo.update(repo.get(first), name="Beach photos")
    assert first not in repo.automatic_ids() and first in repo.real_ids()
    assert repo.resolve("beach PHOTOS") == first


def test_predicted_category_for_uncategorised_images(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=4, per_category=40, dimension=16, uncategorised=40, seed=8)
    sync_search(session, settings, model_id=cat.model.id)
    rows = session.execute(
        text("SELECT id, predicted_category_id, predicted_score FROM images WHERE id = ANY(:i)"),
        {"i": cat.image_ids[cat.labels < 0].tolist()},
    ).all()
    vectors = {int(i): v for i, v in zip(cat.image_ids, cat.vectors, strict=True)}
    correct = 0
    for image_id, predicted, score in rows:
        truth = cat.category_ids[int(np.argmax(cat.centres @ vectors[image_id]))]
        correct += predicted == truth
        assert 0.0 < score <= 1.0
    assert correct >= 0.9 * len(rows)
    view = session.execute(
        text("SELECT predicted_category, predicted_score FROM catalog_images WHERE id = :i"), {"i": int(rows[0][0])}
    ).one()
    assert view.predicted_category is not None and view.predicted_score == pytest.approx(rows[0][2])


def test_text_prototypes_and_text_search_with_tiny_clip(session: Session, settings: Settings) -> None:
    embedder = get_embedder("open_clip-tiny-test")
    cat = make_catalog(
        session,
        n_categories=3,
        per_category=12,
        dimension=embedder.dimension,
        name="open_clip-tiny-test",
        supports_text=True,
    )
    report = sync_search(session, settings, model_id=cat.model.id, embedders=only(embedder))
    assert sorted(report.text_prototypes) == sorted(cat.category_ids)
    text_rows = PrototypeRepository(session).load(cat.model.id, ("text",))
    expected = embedder.encode_texts([f"a photo of a {cat.model.name}-cat-00"])[0]
    assert np.allclose(text_rows[0].vector, expected, atol=1e-5)
    # Renaming re-encodes only the renamed category.
    _rename(session, cat.category_ids[1], "lighthouse")
    assert sync_search(session, settings, model_id=cat.model.id, embedders=only(embedder)).text_prototypes == [
        cat.category_ids[1]
    ]
    service = SearchService(session, SearchRuntime.create(settings, embedder_factory=lambda n: embedder))
    got = service.search_text("a lighthouse at dusk", SearchOptions(k=5, mode="exact"))
    query = embedder.encode_texts(["a lighthouse at dusk"])[0]
    best = cat.image_ids[np.argsort(-(cat.vectors @ query), kind="stable")[:5]]
    assert [r.id for r in got.results] == best.tolist() and got.model == "open_clip-tiny-test"


def test_search_source_reads_what_the_repositories_read(session: Session, settings: Settings) -> None:
    """imsrc._search_source (migration 0019) answers a search's first read: it must give the model row, the image's
    vector and pHash, and the very version text PrototypeRepository.version gives (the stage-1 cache compares them),
    through renames and a rewritten calibration."""
    cat = make_catalog(session, n_categories=3, per_category=20, dimension=16, name="source-a")
    other = make_catalog(session, n_categories=2, per_category=10, dimension=8, name="source-b")  # now active
    sync_search(session, settings, model_id=cat.model.id)
    image = int(cat.image_ids[7])
    session.execute(text("UPDATE images SET phash = CAST(-5 AS bit(64)) WHERE id = :i"), {"i": image})
    vectors = VectorRepository(session)
    protos = PrototypeRepository(session)
    for change in ("none", "rename", "calibration"):
        if change == "rename":
            _rename(session, cat.category_ids[1], "source-renamed")
        elif change == "calibration":
            SearchStateRepository(session).put(f"{STATE_KEY_PREFIX}{cat.model.id}", {"temperature": 0.07})
        model, exists, vector, phash, version = vectors.similar_source("source-a", image, prototype_version=True)
        assert model is not None and (model.id, model.name, model.dimension) == (cat.model.id, "source-a", 16)
        assert exists and phash == -5
        assert vector is not None and np.allclose(vector, cat.vectors[7], atol=1e-6)
        assert version == protos.version(cat.model.id, f"{STATE_KEY_PREFIX}{cat.model.id}"), change
        assert version is not None and version[0] is not None
    seen = {version[0] for version in [vectors.model_and_version("source-a", prototype_version=True)[1]] if version}
    _rename(session, cat.category_ids[0], "source-renamed-again")
    after = vectors.model_and_version("source-a", prototype_version=True)[1]
    assert after is not None and after[0] not in seen  # the version moves with a category's name
    # No name: the active model; an image of another model, or none at all.
    active, exists, vector, _, version = vectors.similar_source(None, image, prototype_version=False)
    assert active is not None and active.id == other.model.id and exists and vector is None and version is None
    assert vectors.similar_source(None, 10**12)[1:3] == (False, None)
    assert vectors.similar_source("no-such-model", image) == (None, False, None, None, None)
    assert vectors.model_and_version("no-such-model", prototype_version=True) == (None, None)


def test_search_source_spells_the_version_as_the_repository_does() -> None:
    """A later change to prototype_version_sql must change migration 0019's function too (or a new migration):
    the stage-1 cache compares the two reads' text."""
    import importlib.util

    from imsrc.catalog.prototypes import prototype_version_sql
    from imsrc.resources import migrations_dir

    path = next((migrations_dir() / "versions").glob("*search_source.py"))
    spec = importlib.util.spec_from_file_location("search_source_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    squash = " ".join  # whitespace aside
    assert squash(prototype_version_sql("m.id", "'stage1:m' || m.id").split()) in squash(module.SEARCH_SOURCE.split())
