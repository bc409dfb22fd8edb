"""Search correctness on a synthetic clustered catalog: exact vs NumPy, two-stage vs exact, recall of the
pgvector and FAISS stage-2 backends (also with filters far from the query), k rows, duplicates, FAISS catch-up."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import ModelRepository, vector_literal
from imsrc.config import Settings
from imsrc.search.faiss_store import FaissStore
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.search.repository import SearchStateRepository
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime, SearchService
from imsrc.search.sync import rebuild_legacy_graphs, sync_search
from imsrc.search.walks import ann_key
from tests.fixtures.database import database_for
from tests.search_data import Synthetic, brute_force, gaussian_mixture, insert_images, make_catalog


def _runtime(settings: Settings, data_dir: Path | None = None, **overrides: object) -> SearchRuntime:
    tuned = settings.model_copy(update=overrides)
    runtime = SearchRuntime.create(tuned, embedder_factory=lambda name: None)
    runtime.faiss = FaissStore(data_dir, flat_max_rows=tuned.faiss_flat_max_rows)
    return runtime


def _ids(response) -> list[int]:  # type: ignore[no-untyped-def]
    return [r.id for r in response.results]


def _queries(cat: Synthetic, n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(cat.vectors), n, replace=False)
    noisy = cat.vectors[picks] + rng.normal(size=(n, cat.vectors.shape[1])) * 0.05
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def small(session: Session, settings: Settings) -> Synthetic:
    cat = make_catalog(session, n_categories=6, per_category=80, dimension=16)
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 10_000}), model_id=cat.model.id)
    return cat


def test_exact_equals_numpy_brute_force(session: Session, settings: Settings, small: Synthetic) -> None:
    service = SearchService(session, _runtime(settings))
    for q in _queries(small, 5):
        got = service.search_vector(small.model, q, SearchOptions(k=10, mode="exact"))
        assert _ids(got) == brute_force(small.vectors, small.image_ids, q, 10)
        expected_scores = np.sort(small.vectors @ q)[::-1][:10]
        assert np.allclose([r.score for r in got.results], expected_scores, atol=1e-5)
        assert got.mode == "exact" and got.stage1 == []


def test_exact_with_category_filter_equals_numpy(session: Session, settings: Settings, small: Synthetic) -> None:
    service = SearchService(session, _runtime(settings))
    q = _queries(small, 1)[0]
    names = [f"{small.model.name}-cat-01", f"{small.model.name}-cat-04"]
    got = service.search_vector(small.model, q, SearchOptions(k=10, mode="exact", category=names))
    mask = np.isin(small.labels, [1, 4])
    assert _ids(got) == brute_force(small.vectors, small.image_ids, q, 10, mask)


@pytest.mark.parametrize("backend", ["pgvector", "faiss"])
def test_two_stage_over_all_categories_equals_exact(
    session: Session, settings: Settings, small: Synthetic, backend: str
) -> None:
    # Categories this small are scanned exactly (no HNSW, flat FAISS), so the answer must be identical.
    service = SearchService(session, _runtime(settings, search_exact_max_rows=10_000, faiss_flat_max_rows=10_000))
    for q in _queries(small, 5):
        two = service.search_vector(small.model, q, SearchOptions(k=10, categories=6, backend=backend))
        exact = service.search_vector(small.model, q, SearchOptions(k=10, mode="exact"))
        assert _ids(two) == _ids(exact)
        assert len(two.stage1) == 6 and two.mode == "two_stage" and two.backend == backend


def test_stage1_ranks_the_query_category_first(session: Session, settings: Settings, small: Synthetic) -> None:
    service = SearchService(session, _runtime(settings))
    hits = 0
    for i, q in enumerate(_queries(small, 20)):
        got = service.search_vector(small.model, q, SearchOptions(k=5, categories=1))
        true_label = small.labels[np.argmax(small.vectors @ q)]
        hits += got.stage1[0].category_id == small.category_ids[true_label]
        assert len(got.stage1) == 1 and i >= 0
    assert hits >= 19


@pytest.fixture()
def large(session: Session, settings: Settings) -> tuple[Synthetic, Settings]:
    # Big enough that every category gets its own pgvector HNSW index (FAISS PQ sub-indexes: test_search_faiss_pq).
    tuned = settings.model_copy(update={"search_exact_max_rows": 200, "faiss_flat_max_rows": 200})
    cat = make_catalog(session, n_categories=10, per_category=400, dimension=32, seed=3)
    report = sync_search(session, tuned, model_id=cat.model.id)
    assert sorted(report.indexes_created) == sorted(cat.category_ids)
    return cat, tuned


def _recall(got: list[int], truth: list[int]) -> float:
    return len(set(got) & set(truth)) / len(truth)


@pytest.mark.parametrize("backend", ["pgvector", "faiss"])
def test_stage2_recall_with_and_without_far_filters(
    session: Session, large: tuple[Synthetic, Settings], backend: str
) -> None:
    cat, tuned = large
    service = SearchService(session, _runtime(tuned))
    queries = _queries(cat, 20, seed=11)
    recalls, far_recalls = [], []
    for q in queries:
        got = service.search_vector(cat.model, q, SearchOptions(k=10, categories=3, backend=backend))
        exact = service.search_vector(cat.model, q, SearchOptions(k=10, mode="exact"))
        assert len(got.results) == 10
        recalls.append(_recall(_ids(got), _ids(exact)))
        # The three categories farthest from the query: where a post-filtered HNSW returns almost nothing.
        far = np.argsort(cat.centres @ q)[:3]
        names = [f"{cat.model.name}-cat-{i:02d}" for i in far]
        filtered = service.search_vector(cat.model, q, SearchOptions(k=10, category=names, backend=backend))
        truth = brute_force(cat.vectors, cat.image_ids, q, 10, np.isin(cat.labels, far))
        assert len(filtered.results) == 10
        assert {r.category_id for r in filtered.results} <= {cat.category_ids[i] for i in far}
        far_recalls.append(_recall(_ids(filtered), truth))
    assert np.mean(recalls) >= 0.95
    assert np.mean(far_recalls) >= 0.95


def test_pgvector_plan_uses_the_per_category_index(session: Session, large: tuple[Synthetic, Settings]) -> None:
    cat, _ = large
    c = cat.category_ids[0]
    session.execute(text("SET LOCAL enable_sort = off"))
    session.execute(text("SET LOCAL enable_seqscan = off"))
    plan = "\n".join(
        r[0]
        for r in session.execute(
            text(
                f"EXPLAIN SELECT image_id FROM category_vectors WHERE model_id = {cat.model.id} AND category_id = {c} "
                f"ORDER BY (embedding::halfvec(32)) <#> CAST(:q AS halfvec(32)) LIMIT 10"
            ),
            {"q": str([0.1] * 32)},
        )
    )
    assert f"ix_embeddings_hv_m{cat.model.id}_c{c}" in plan


@pytest.mark.parametrize("backend", ["pgvector", "faiss"])
def test_filtered_query_always_returns_k_rows(
    session: Session, large: tuple[Synthetic, Settings], backend: str
) -> None:
    cat, tuned = large
    service = SearchService(session, _runtime(tuned))
    rng = np.random.default_rng(5)
    for q in _queries(cat, 10, seed=5):
        names = [f"{cat.model.name}-cat-{i:02d}" for i in rng.choice(10, 3, replace=False)]
        for k in (1, 10, 50):
            got = service.search_vector(cat.model, q, SearchOptions(k=k, category=names, backend=backend))
            assert len(got.results) == k


@pytest.mark.parametrize("backend", ["pgvector", "faiss"])
def test_duplicates_hidden_unless_asked(session: Session, settings: Settings, small: Synthetic, backend: str) -> None:
    service = SearchService(session, _runtime(settings, search_exact_max_rows=10_000))
    q = _queries(small, 1)[0]
    before = _ids(service.search_vector(small.model, q, SearchOptions(k=10, mode="exact")))
    # Mark the 2nd and 4th best as copies of the best.
    session.execute(
        text("UPDATE images SET canonical_id = :c WHERE id = ANY(:d)"), {"c": before[0], "d": [before[1], before[3]]}
    )
    for mode in ("exact", "two_stage", "ann"):
        got = service.search_vector(small.model, q, SearchOptions(k=10, mode=mode, categories=6, backend=backend))
        assert before[1] not in _ids(got) and before[3] not in _ids(got)
        assert len(got.results) == 10
        assert got.results[0].id == before[0] and got.results[0].duplicates == 2
        shown = service.search_vector(
            small.model, q, SearchOptions(k=10, mode=mode, categories=6, backend=backend, include_duplicates=True)
        )
        assert _ids(shown)[:4] == before[:4]


@pytest.mark.parametrize("flat_max_rows", [5000, 10])  # flat sub-indexes, rebuilt on growth or not
def test_faiss_sees_images_added_moved_and_deleted_after_its_build(
    session: Session, settings: Settings, small: Synthetic, scratch: Path, flat_max_rows: int
) -> None:
    runtime = _runtime(settings, scratch, faiss_flat_max_rows=flat_max_rows)
    service = SearchService(session, runtime)
    index = runtime.faiss.get(session, small.model)
    assert len(index) == len(small.image_ids)
    target = small.category_ids[2]
    name = f"{small.model.name}-cat-02"
    # A new image right on the query, added after the build, in category 2.
    query = _queries(small, 1)[0]
    new_id = int(insert_images(session, small.model, query[None, :], [target], salt="late")[0])
    got = service.search_vector(small.model, query, SearchOptions(k=5, category=[name], backend="faiss"))
    assert got.results[0].id == new_id and got.results[0].score == pytest.approx(1.0, abs=1e-5)
    # Moved to another category: gone from category 2, found in category 3.
    session.execute(text("UPDATE images SET category_id = :c WHERE id = :i"), {"c": small.category_ids[3], "i": new_id})
    got = service.search_vector(small.model, query, SearchOptions(k=5, category=[name], backend="faiss"))
    assert new_id not in _ids(got)
    got = service.search_vector(
        small.model, query, SearchOptions(k=5, category=[f"{small.model.name}-cat-03"], backend="faiss")
    )
    assert got.results[0].id == new_id
    # Deleted: gone everywhere.
    session.execute(text("DELETE FROM images WHERE id = :i"), {"i": new_id})
    got = service.search_vector(small.model, query, SearchOptions(k=5, mode="ann", backend="faiss"))
    assert new_id not in _ids(got) and len(got.results) == 5


def test_faiss_index_is_saved_validated_and_reloaded(
    session: Session, settings: Settings, small: Synthetic, scratch: Path
) -> None:
    first = _runtime(settings, scratch)
    built = first.faiss.get(session, small.model)
    folder = scratch / "faiss" / f"model-{small.model.id}"
    assert (folder / "meta.json").is_file()
    second = _runtime(settings, scratch)
    loaded = second.faiss.get(session, small.model)
    assert len(loaded) == len(built) and second.faiss.last_build_s is None  # loaded, not rebuilt
    q = _queries(small, 1)[0]
    assert loaded.search(q, None, 10) == built.search(q, None, 10)
    # A corrupted file is detected and the index rebuilt from the database.
    victim = next(folder.glob("*.faiss"))
    victim.write_bytes(victim.read_bytes()[:-16] + b"x" * 16)
    third = _runtime(settings, scratch)
    rebuilt = third.faiss.get(session, small.model)
    assert third.faiss.last_build_s is not None and len(rebuilt) == len(built)


def test_ann_mode_without_categories(session: Session, settings: Settings, small: Synthetic) -> None:
    service = SearchService(session, _runtime(settings))
    for q in _queries(small, 3):
        exact = _ids(service.search_vector(small.model, q, SearchOptions(k=10, mode="exact")))
        for backend in ("pgvector", "faiss"):
            got = service.search_vector(small.model, q, SearchOptions(k=10, mode="ann", backend=backend))
            assert got.stage1 == [] and _recall(_ids(got), exact) >= 0.9


def test_adaptive_fan_out_covers_the_score_mass(session: Session, settings: Settings, small: Synthetic) -> None:
    service = SearchService(session, _runtime(settings))
    q = small.centres[0]
    tight = service.search_vector(small.model, q, SearchOptions(k=5, categories="auto"))
    assert 1 <= len(tight.stage1) < 6
    assert tight.stage1[0].category_id == small.category_ids[0]
    loose = SearchService(session, _runtime(settings, search_score_mass=1.0))
    assert len(loose.search_vector(small.model, q, SearchOptions(k=5, categories="auto")).stage1) == 6


def test_gaussian_mixture_is_clustered() -> None:
    vectors, labels, centres = gaussian_mixture(4, 50, 16)
    own = np.einsum("ij,ij->i", vectors, centres[labels])
    assert own.mean() > 0.9 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_text_query_on_an_image_only_model_is_a_clear_error(session: Session, settings: Settings) -> None:
    from imsrc.embeddings import get_embedder
    from imsrc.search.errors import ModelUnavailableError

    embedder = get_embedder("efficientnet-lite0")
    cat = make_catalog(session, n_categories=2, per_category=5, dimension=embedder.dimension, name="efficientnet-lite0")
    service = SearchService(session, SearchRuntime.create(settings, embedder_factory=lambda name: embedder))
    with pytest.raises(ModelUnavailableError) as err:
        service.search_text("a cat", SearchOptions(k=3))
    assert err.value.status_code == 400 and err.value.code == "text_not_supported"
    assert "images only" in err.value.message and cat.model.name == "efficientnet-lite0"


def test_sync_replaces_full_precision_category_indexes_with_halfvec_ones(session: Session, settings: Settings) -> None:
    # Catalogs indexed before the switch have ix_embeddings_ip_* indexes on embedding::vector(d).
    cat = make_catalog(session, n_categories=2, per_category=30, dimension=8, name="legacy")
    c = cat.category_ids[0]
    legacy = f"ix_embeddings_ip_m{cat.model.id}_c{c}"
    session.execute(
        text(
            f"CREATE INDEX {legacy} ON embeddings USING hnsw ((embedding::vector(8)) vector_ip_ops) "
            f"WHERE model_id = {cat.model.id} AND category_id = {c}"
        )
    )
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 10}), model_id=cat.model.id)
    names = set(
        session.execute(
            text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'embeddings' OR tablename LIKE 'category_vectors%'"
            )
        ).scalars()
    )
    assert legacy not in names
    assert {f"ix_embeddings_hv_m{cat.model.id}_c{i}" for i in cat.category_ids} <= names


def _warns_of_a_legacy_graph(database, settings: Settings, caplog: pytest.LogCaptureFixture) -> bool:  # type: ignore[no-untyped-def]
    """Whether the server's start-up warm-up says the active model's graph is to be rebuilt."""
    from imsrc.search.warmup import WarmReport, warm

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imsrc.search.warmup"):
        warm(database, _runtime(settings), WarmReport())
    return any("imsrc categories sync" in r.getMessage() for r in caplog.records)


def test_categories_sync_rebuilds_a_full_precision_global_graph_on_halfvec(
    create_database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Catalogs indexed before the switch have the model's graph over every image on embedding::vector(d): mode
    `ann` (service and SQL) walks it as it is until `imsrc categories sync` rebuilds it on halfvec, concurrently
    and with the same m, and refits its width; scores stay full precision either way."""
    settings = Settings(
        database_url=create_database("imsrc_legacy_graph"), data_dir=tmp_path, search_warmup=False, _env_file=None
    )  # type: ignore[call-arg]
    database = database_for(settings)
    try:
        with database.session() as session:
            cat = make_catalog(session, n_categories=2, per_category=40, dimension=8, name="legacy-global")
            name = f"ix_embeddings_hnsw_m{cat.model.id}"
            session.execute(text(f"DROP INDEX {name}"))
            session.execute(
                text(
                    f"CREATE INDEX {name} ON embeddings USING hnsw ((embedding::vector(8)) vector_cosine_ops) "
                    f"WITH (m = 8) WHERE model_id = {cat.model.id}"
                )
            )
            sync_search(session, settings, model_id=cat.model.id)
        q = _queries(cat, 1)[0]
        truth = brute_force(cat.vectors, cat.image_ids, q, 5)
        exact = {int(i): float(s) for i, s in zip(cat.image_ids, cat.vectors @ q, strict=True)}

        def check(half: bool) -> None:
            with database.session() as session:
                neighbours = NeighbourRepository(session)
                walks = [
                    neighbours.global_walks_index(cat.model.id, 8, vector_literal(q), 15, half=h) for h in (False, True)
                ]
                # written in the graph's own expression, or the walk would be an exact sort of every row
                assert walks == [not half, half]
                assert ModelRepository(session).global_index_half(cat.model.id) is half
                kind = session.execute(text("SELECT imsrc._global_type(:m, 8)"), {"m": cat.model.id}).scalar()
                assert kind == ("halfvec(8)" if half else "vector(8)")
                service = SearchService(session, _runtime(settings))
                got = service.search_vector(cat.model, q, SearchOptions(k=5, mode="ann"))
                assert got.mode == "ann" and _ids(got) == truth
                assert all(abs(h.score - exact[h.id]) < 1e-6 for h in got.results)
                sql = session.execute(
                    text("SELECT image_id, score FROM imsrc.search(CAST(:q AS vector), 5, NULL, 'ann', :m)"),
                    {"q": vector_literal(q), "m": cat.model.name},
                ).all()
                assert [int(r[0]) for r in sql] == truth
                assert all(abs(float(r[1]) - exact[int(r[0])]) < 1e-6 for r in sql)

        check(half=False)
        assert _warns_of_a_legacy_graph(database, settings, caplog)
        assert rebuild_legacy_graphs(database, settle_s=0) == ["legacy-global"]
        assert not _warns_of_a_legacy_graph(database, settings, caplog)
        with database.session() as session:
            options = session.execute(text("SELECT reloptions FROM pg_class WHERE relname = :n"), {"n": name}).scalar()
            assert options == ["m=8"]
            left = session.execute(text("SELECT count(*) FROM pg_class WHERE relname LIKE :p"), {"p": f"{name}_%"})
            assert left.scalar() == 0  # no _half or _legacy copy stays behind
            assert SearchStateRepository(session).get(ann_key(cat.model.id)) == {}  # the old graph's width is gone
            assert sync_search(session, settings, model_id=cat.model.id).ann_calibrated
        check(half=True)
        assert rebuild_legacy_graphs(database, settle_s=0) == []
    finally:
        database.dispose()


def test_a_small_catalog_answers_two_stage_as_ann_and_says_so(
    session: Session, settings: Settings, small: Synthetic
) -> None:
    """pgvector: under IMSRC_SEARCH_TWO_STAGE_MIN_ROWS one graph walk beats stage 1 + per-category walks, so the
    service runs `ann` and reports it; an explicit fan-out, a category filter or FAISS keep two-stage."""
    rows = len(small.image_ids)
    q = _queries(small, 1)[0]
    below = SearchService(session, _runtime(settings, search_two_stage_min_rows=rows + 1))
    got = below.search_vector(small.model, q, SearchOptions(k=10))
    assert got.mode == "ann" and got.stage1 == [] and got.backend == "pgvector"
    assert _ids(got) == _ids(below.search_vector(small.model, q, SearchOptions(k=10, mode="ann")))
    assert below.search_vector(small.model, q, SearchOptions(k=10, categories=2)).mode == "two_stage"
    assert below.search_vector(small.model, q, SearchOptions(k=10, backend="faiss")).mode == "two_stage"
    named = below.search_vector(small.model, q, SearchOptions(k=10, category=[f"{small.model.name}-cat-01"]))
    assert named.mode == "two_stage" and {h.category_id for h in named.results} == {named.results[0].category_id}
    at = SearchService(session, _runtime(settings, search_two_stage_min_rows=rows))
    reached = at.search_vector(small.model, q, SearchOptions(k=10))
    assert reached.mode == "two_stage" and reached.stage1


def test_repeated_searches_leave_no_prepared_statement_for_a_generic_plan(
    session: Session, settings: Settings, small: Synthetic
) -> None:
    """psycopg prepares a statement on its sixth run on a connection, and PostgreSQL may then plan it once for any
    query vector (a generic plan): the same per-category walk got ~1.5x slower on a pooled connection. The
    engine turns automatic preparation off, so every search is planned for its own vector."""
    service = SearchService(session, _runtime(settings))
    q = _queries(small, 1)[0]
    first = _ids(service.search_vector(small.model, q, SearchOptions(k=10, categories=1)))
    for _ in range(8):  # the same statement text each time: prepared on the sixth run before
        assert _ids(service.search_vector(small.model, q, SearchOptions(k=10, categories=1))) == first
    assert session.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one() == 0
