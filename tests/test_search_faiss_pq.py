"""Large categories: FAISS PQ fast-scan sub-indexes (exact re-rank) and pgvector's ef_search policy, on the
hard case for any index: isotropic categories, where inside a category every distance to a query is nearly
tied, and queries from other categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from imsrc.catalog.repository import vector_literal
from imsrc.config import Settings
from imsrc.search.faiss_index import RERANK_FACTOR, FaissModelIndex
from imsrc.search.faiss_store import FaissStore
from imsrc.search.pg_queries import (
    EF_SEARCH_MAX,
    FAR_EXACT_MAX_ROWS,
    NeighbourRepository,
    branch_plan,
    category_ef_search,
)
from imsrc.search.repository import Watermark
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime, SearchService
from imsrc.search.sync import sync_search
from tests.search_data import brute_force, gaussian_mixture, insert_images, make_catalog

DIM = 64
PER = 2500


def _recall(got: list[int], truth: list[int]) -> float:
    return len(set(got) & set(truth)) / len(truth)


def _index(flat_max_rows: int = 1000) -> FaissModelIndex:
    return FaissModelIndex(
        model_id=1, model_name="t", dimension=DIM, flat_max_rows=flat_max_rows, watermark=Watermark(0, (), None, 0)
    )


@pytest.fixture(scope="module")
def isotropic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # spread 0.8: the noise is almost as long as the centre, in every direction (bench/search's mixture)
    return gaussian_mixture(4, PER, DIM, spread=0.8, seed=21)


def _built(vectors: np.ndarray, labels: np.ndarray, flat_max_rows: int = 1000) -> FaissModelIndex:
    index = _index(flat_max_rows)
    for c in range(4):
        rows = np.flatnonzero(labels == c)
        index.add_category(c, rows.astype(np.int64), vectors[rows])
    return index


def test_pq_sub_indexes_reach_exact_recall_near_and_far(isotropic: tuple[np.ndarray, ...]) -> None:
    vectors, labels, centres = isotropic
    index = _built(vectors, labels)
    assert {s.kind for s in index.subs.values()} == {"pq"}
    ids = np.arange(len(vectors))
    rng = np.random.default_rng(3)
    near, far = [], []
    for c in range(4):
        for _ in range(8):
            noisy = centres[c] + rng.normal(size=DIM) * 0.8 / np.sqrt(DIM)
            q = (noisy / np.linalg.norm(noisy)).astype(np.float32)
            got = [h[0] for h in index.search(q, [c], 10)]
            assert len(got) == 10
            near.append(_recall(got, brute_force(vectors, ids, q, 10, labels == c)))
            others = [o for o in range(4) if o != c][:2]  # a filter of categories the query is not like
            got = [h[0] for h in index.search(q, others, 10)]
            far.append(_recall(got, brute_force(vectors, ids, q, 10, np.isin(labels, others))))
    assert np.mean(near) >= 0.95 and np.mean(far) >= 0.95
    # Scores are the exact (re-ranked) inner products, not PQ estimates.
    q = vectors[0]
    top = index.search(q, None, 3)
    assert top[0][0] == 0 and top[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in top] == pytest.approx(
        sorted((vectors[[i for i, _ in top]] @ q).tolist(), reverse=True), abs=1e-5
    )


def test_pq_tombstones_never_crowd_out_live_rows(isotropic: tuple[np.ndarray, ...]) -> None:
    vectors, labels, _ = isotropic
    index = _built(vectors, labels)
    q = vectors[np.flatnonzero(labels == 1)[0]]
    first = [h[0] for h in index.search(q, [1], 10)]
    gone = first[:4]
    index.apply(gone, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    again = [h[0] for h in index.search(q, [1], 10)]
    assert len(again) == 10 and not set(gone) & set(again)
    assert again[:6] == first[4:]
    # Remove most of a category: still exactly the live rows, up to k.
    rows = np.flatnonzero(labels == 2)
    index.apply(
        rows[: len(rows) - 7].tolist(), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)
    )
    assert sorted(h[0] for h in index.search(q, [2], 10)) == sorted(rows[-7:].tolist())


def test_growing_categories_switch_to_pq_and_retrain(isotropic: tuple[np.ndarray, ...]) -> None:
    vectors, labels, _ = isotropic
    rows = np.flatnonzero(labels == 0)
    index = _index()
    index.add_category(0, rows[:600].astype(np.int64), vectors[rows[:600]])
    assert index.subs[0].kind == "flat"  # too few rows to train codebooks
    index.apply([], rows[600:1200].astype(np.int64), np.zeros(600, np.int64), vectors[rows[600:1200]])
    assert index.subs[0].kind == "pq" and index.subs[0].trained_on == 1200
    more = rows[1200:].astype(np.int64)  # 1300 more: 2500 live, under 4x the training rows
    index.apply([], more, np.zeros(len(more), np.int64), vectors[more])
    assert index.subs[0].trained_on == 1200 and index.subs[0].live == PER
    # Codebooks trained on 1,200 rows still find what was added later (the re-rank is exact).
    for i in more[:20].tolist():
        assert index.search(vectors[i], [0], 1)[0][0] == i
    extra, _, _ = gaussian_mixture(1, 2400, DIM, spread=0.8, seed=99)
    extra_ids = np.arange(100_000, 100_000 + len(extra), dtype=np.int64)
    index.apply([], extra_ids, np.zeros(len(extra), np.int64), extra.astype(np.float32))
    assert index.subs[0].trained_on == PER + len(extra)  # grown past 4x: retrained on everything
    assert RERANK_FACTOR >= 20


def test_saved_pq_index_reloads_without_retraining(session: Session, settings: Settings, scratch: Path) -> None:
    cat = make_catalog(session, n_categories=2, per_category=1100, dimension=16, spread=0.8, seed=4)
    tuned = settings.model_copy(update={"faiss_flat_max_rows": 1000})
    first = FaissStore(scratch, flat_max_rows=1000)
    built = first.get(session, cat.model)
    assert {s.kind for s in built.subs.values()} == {"pq"}
    second = FaissStore(scratch, flat_max_rows=1000)
    loaded = second.get(session, cat.model)
    assert second.last_build_s is None  # read from disk
    # Memory-mapped (shared by every process that maps the same files), the builder's copy included.
    assert all(s.mapped for s in loaded.subs.values()) and all(s.mapped for s in built.subs.values())
    assert {c: s.trained_on for c, s in loaded.subs.items()} == {c: 1100 for c in cat.category_ids}
    for q in cat.vectors[:5]:
        assert loaded.search(q, None, 10) == built.search(q, None, 10)
    # An image added after the save reaches the loaded index through the change log, with no rebuild.
    probe = cat.vectors[7] + 0.01
    probe = (probe / np.linalg.norm(probe)).astype(np.float32)
    new_id = int(insert_images(session, cat.model, probe[None, :], [cat.category_ids[0]], salt="late")[0])
    runtime = SearchRuntime.create(tuned, embedder_factory=lambda name: None)
    runtime.faiss = second
    got = SearchService(session, runtime).search_vector(
        cat.model, probe, SearchOptions(k=3, category=[f"{cat.model.name}-cat-00"], backend="faiss")
    )
    assert got.results[0].id == new_id
    assert loaded.subs[cat.category_ids[0]].trained_on == 1100
    # Only the changed category left the shared pages (an add to a mapped index would abort the process).
    assert not loaded.subs[cat.category_ids[0]].mapped and loaded.subs[cat.category_ids[1]].mapped


def test_category_ef_search_policy() -> None:
    assert category_ef_search(1_000, 100, near=True) == 100
    assert category_ef_search(10_000, 100, near=True) == 200
    assert category_ef_search(10_000_000, 100, near=True) == EF_SEARCH_MAX
    assert category_ef_search(10_000, 100, near=False) == EF_SEARCH_MAX
    # Far and small: an exact scan beats a 1000-wide walk; far and large: the wide walk; unindexed: exact.
    indexed = {1: 10_000, 2: FAR_EXACT_MAX_ROWS - 1, 3: 10_000}
    plan, ef = branch_plan(indexed, [1, 2, 3, 4], near={1}, base=100)
    assert plan == [(1, True), (2, False), (3, True), (4, False)] and ef == EF_SEARCH_MAX
    assert branch_plan(indexed, [1], near={1}, base=100) == ([(1, True)], 200)


def test_pgvector_far_filter_widens_the_walk(
    session: Session, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter of categories unlike the query: pgvector must still find the true top 10 there."""
    # These 1,500-row categories would be scanned exactly as far ones; make them walk, the case under test.
    monkeypatch.setattr("imsrc.search.pg_queries.FAR_EXACT_MAX_ROWS", 1000)
    cat = make_catalog(session, n_categories=4, per_category=1500, dimension=DIM, spread=0.8, seed=5, name="iso-pg")
    tuned = settings.model_copy(update={"search_exact_max_rows": 200, "search_ef_search": 16})
    report = sync_search(session, tuned, model_id=cat.model.id, autogroup_images=False)
    assert sorted(report.indexes_created) == sorted(cat.category_ids)
    service = SearchService(session, SearchRuntime.create(tuned, embedder_factory=lambda name: None))
    nb = NeighbourRepository(session)
    rng = np.random.default_rng(8)
    served, narrow = [], []
    for c in range(4):
        for _ in range(5):
            noisy = cat.centres[c] + rng.normal(size=DIM) * 0.8 / np.sqrt(DIM)
            q = (noisy / np.linalg.norm(noisy)).astype(np.float32)
            others = [o for o in range(4) if o != c][:2]
            truth = brute_force(cat.vectors, cat.image_ids, q, 10, np.isin(cat.labels, others))
            got = service.search_vector(
                cat.model, q, SearchOptions(k=10, category=[f"iso-pg-cat-{o:02d}" for o in others])
            )
            assert len(got.results) == 10
            served.append(_recall([r.id for r in got.results], truth))
            # The same branches walked at the base width: what the policy exists to avoid.
            hits = nb.per_category(
                cat.model.id, DIM, vector_literal(q), [(cat.category_ids[o], True) for o in others], 10, 16
            )
            narrow.append(_recall([h[0] for h in hits], truth))
    assert np.mean(served) >= 0.95
    assert np.mean(narrow) < np.mean(served)


def test_default_stage1_follows_the_score_mass_up_to_the_cap(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=6, per_category=60, dimension=16, seed=9, name="fan")
    sync_search(session, settings, model_id=cat.model.id, autogroup_images=False)
    service = SearchService(session, SearchRuntime.create(settings, embedder_factory=lambda name: None))
    q = cat.centres[2]
    assert [c.category_id for c in service.search_vector(cat.model, q, SearchOptions(k=5)).stage1] == [
        cat.category_ids[2]
    ]  # a clear query: one category
    assert len(service.search_vector(cat.model, q, SearchOptions(k=5, categories=4)).stage1) == 4
    # All of the score mass: every one of the 6 categories, more than the cap (3). Stage 1 is then not sure: the
    # query is answered by ann over the whole model (the default), or cut at the cap (fallback off).
    for fallback in (True, False):
        spread = SearchService(
            session,
            SearchRuntime.create(
                settings.model_copy(update={"search_score_mass": 1.0, "search_stage1_fallback": fallback}),
                embedder_factory=lambda name: None,
            ),
        )
        got = spread.search_vector(cat.model, q, SearchOptions(k=5))
        if fallback:
            assert got.mode == "ann" and got.stage1 == [] and len(got.results) == 5
        else:
            assert got.mode == "two_stage" and len(got.stage1) == settings.search_categories
