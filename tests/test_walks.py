"""Per-category walk widths (search/walks.py): calibrated at search sync on each category's own members, the
narrowest width reaching the target, read the same way by the service and by the SQL functions."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import vector_literal
from imsrc.config import Settings
from imsrc.search.pg_queries import NeighbourRepository, WalkWidth, branch_plan, category_ef_search
from imsrc.search.repository import SearchStateRepository, VectorRepository, copy_batches
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime
from imsrc.search.sync import refresh_derived, sync_search
from imsrc.search.walks import (
    ANN_SAMPLES,
    LADDER,
    LIMIT,
    SAMPLES,
    K,
    _stale,
    ann_key,
    ann_samples,
    exact_top,
    state_key,
    widths,
)

from .search_data import Synthetic, brute_force, insert_images, make_catalog

TARGET = 0.995


def _tuned(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"search_exact_max_rows": 200, "search_walk_recall": TARGET, **update})


def _recall(neighbours: NeighbourRepository, cat: Synthetic, category_id: int, ef: int) -> float:
    """Recall of the walk at `ef` for the calibration's own members, against a NumPy brute force."""
    mask = cat.labels == cat.category_ids.index(category_id)
    found = []
    for image_id, query in neighbours.sample_members(cat.model.id, category_id, SAMPLES):
        row = int(np.flatnonzero(cat.image_ids == image_id)[0])
        others = mask.copy()
        others[row] = False
        truth = set(brute_force(cat.vectors, cat.image_ids, cat.vectors[row], K, others))
        walked = neighbours.per_category(cat.model.id, cat.model.dimension, query, [(category_id, True)], LIMIT, ef)
        found.append(len(truth & {i for i, _ in walked if i != image_id}) / len(truth))
    return sum(found) / len(found)


def test_each_category_gets_the_narrowest_width_reaching_the_target(session: Session, settings: Settings) -> None:
    # Isotropic 256-d categories of 2,000 (nearly tied neighbours): the narrowest width does not reach 0.995.
    cat = make_catalog(session, n_categories=2, per_category=2000, dimension=256, name="walks", spread=1.0)
    report = sync_search(session, _tuned(settings), model_id=cat.model.id)
    assert report.walks_calibrated == sorted(cat.category_ids)
    stored = SearchStateRepository(session).get(state_key(cat.model.id))
    neighbours = NeighbourRepository(session)
    indexed = neighbours.category_indexes(cat.model.id)
    assert sorted(int(c) for c in stored) == sorted(cat.category_ids)
    narrower_than_the_rule = needed_more = 0
    for c in cat.category_ids:
        entry = stored[str(c)]
        assert entry["ef"] in LADDER and entry["rows"] == indexed[c] == 2000
        assert entry["samples"] == SAMPLES and entry["target"] == TARGET and entry["recall"] >= TARGET
        # Measured independently (NumPy brute force), the stored width reaches the target and the one below
        # it on the ladder does not (one neighbour of 400 of slack for float rounding at near-ties).
        assert _recall(neighbours, cat, c, entry["ef"]) >= TARGET - 0.0025
        # The HNSW graph is random per build: on some builds one of the two categories already reaches the target
        # at the narrowest width (seen on main: ef 16 one run in three, 24 otherwise), so only the other must
        # need more.
        below = LADDER.index(entry["ef"]) - 1
        if below >= 0:
            needed_more += 1
            assert _recall(neighbours, cat, c, LADDER[below]) < TARGET + 0.0025
        narrower_than_the_rule += entry["ef"] < category_ef_search(2000, settings.search_ef_search, near=True)
    assert needed_more >= 1, "the data should need more than the narrowest width"
    assert narrower_than_the_rule >= 1

    # The service plans with the stored widths; a category the query is not near still gets the maximum.
    table = widths(stored)
    a, b = cat.category_ids
    _, ef = branch_plan(indexed, [a], {a}, settings.search_ef_search, table)
    assert ef == stored[str(a)]["ef"]
    _, ef = branch_plan(indexed, [a, b], {a}, settings.search_ef_search, table)
    assert ef == 1000


def test_sql_computes_the_same_width_as_the_service(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=2, per_category=250, dimension=16, name="walks-sql")
    sync_search(session, _tuned(settings), model_id=cat.model.id)
    stored = SearchStateRepository(session).get(state_key(cat.model.id))
    a = cat.category_ids[0]
    width = widths(stored)[a]
    # Grown since calibration (sqrt of the growth), shrunk (the calibrated width), and the size rule for a
    # category without a stored width, at two floors.
    for rows in (0, 1, width.rows, width.rows + 1, 2 * width.rows, 7 * width.rows + 3, 10**7):
        for base in (10, 100):
            sql = session.execute(
                text("SELECT imsrc._walk_ef(:m, :c, :r, :b), imsrc._walk_ef(:m, -1, :r, :b)"),
                {"m": cat.model.id, "c": a, "r": rows, "b": base},
            ).one()
            assert sql[0] == category_ef_search(rows, base, near=True, width=width)
            assert sql[1] == category_ef_search(rows, base, near=True)
    assert category_ef_search(4 * width.rows, 100, near=True, width=width) == min(1000, 2 * width.ef)


def test_widths_follow_growth_and_can_be_turned_off(session: Session, settings: Settings) -> None:
    cat = make_catalog(session, n_categories=2, per_category=250, dimension=16, name="walks-drift")
    tuned = _tuned(settings)
    assert sync_search(session, tuned, model_id=cat.model.id).walks_calibrated == sorted(cat.category_ids)
    assert sync_search(session, tuned, model_id=cat.model.id).walks_calibrated == []  # nothing changed

    a, b = cat.category_ids
    rng = np.random.default_rng(5)
    more = cat.vectors[: len(cat.vectors) // 2] + rng.normal(0, 0.05, (250, 16)).astype(np.float32)
    more /= np.linalg.norm(more, axis=1, keepdims=True)
    insert_images(session, cat.model, more, [a] * len(more), salt="more")
    session.execute(text(f"ANALYZE category_vectors_c{a}"))  # the index's row estimate, as autovacuum keeps it
    report = sync_search(session, tuned, model_id=cat.model.id)
    assert report.walks_calibrated == [a]
    assert SearchStateRepository(session).get(state_key(cat.model.id))[str(a)]["rows"] == 500

    # Uploads under load leave it to the background refresher, like the stage-1 calibration.
    stricter = _tuned(settings, search_walk_recall=0.999)
    deferred = sync_search(session, stricter, model_id=cat.model.id, defer_derived=True)
    assert deferred.walks_calibrated == [] and deferred.derived_due
    assert refresh_derived(session, stricter, model_id=cat.model.id).walks_calibrated == [a, b]

    off = _tuned(settings, search_walk_recall=0.0)
    sync_search(session, off, model_id=cat.model.id)
    assert SearchStateRepository(session).get(state_key(cat.model.id)) == {}
    rows = NeighbourRepository(session).category_indexes(cat.model.id)[b]
    got = session.execute(
        text("SELECT imsrc._walk_ef(:m, :c, :r, 100)"), {"m": cat.model.id, "c": b, "r": rows}
    ).scalar()
    assert got == category_ef_search(rows, 100, near=True) == max(100, int(np.ceil(2 * np.sqrt(rows))))


def test_a_walk_that_cannot_use_the_index_is_not_calibrated(session: Session, settings: Settings) -> None:
    """Without the category's index the statement ends in an exact sort: a calibration would measure exact
    answers and keep the narrowest width. walks_index tells the two apart from the plan."""
    cat = make_catalog(session, n_categories=2, per_category=250, dimension=16, name="walks-plan")
    neighbours = NeighbourRepository(session)
    a = cat.category_ids[0]
    query = vector_literal(cat.vectors[0])
    assert not neighbours.walks_index(cat.model.id, 16, a, query, LIMIT)
    sync_search(session, _tuned(settings), model_id=cat.model.id)
    assert neighbours.walks_index(cat.model.id, 16, a, query, LIMIT)
    assert WalkWidth(16, 250) == widths({str(a): {"ef": 16, "rows": 250}})[a]
    assert widths({str(a): {"ef": "wide"}, "x": {}}) == {}


def test_unreadable_stored_widths_are_calibrated_again_not_a_failed_sync(session: Session, settings: Settings) -> None:
    """A walks:m<model> value holding entries this release cannot read (another release's keys, a hand edit) is
    treated as missing: the sync calibrates those categories again and drops what it cannot read."""
    cat = make_catalog(session, n_categories=2, per_category=250, dimension=16, name="walks-unreadable")
    tuned = _tuned(settings)
    sync_search(session, tuned, model_id=cat.model.id)
    a, b = cat.category_ids
    state = SearchStateRepository(session)
    stored = state.get(state_key(cat.model.id))
    state.put(
        state_key(cat.model.id), {**stored, "x": {"ef": 16}, str(a): 5, str(b): {**stored[str(b)], "rows": "many"}}
    )
    report = sync_search(session, tuned, model_id=cat.model.id)
    assert report.walks_calibrated == [a, b]
    assert sorted(state.get(state_key(cat.model.id))) == sorted([str(a), str(b)])


def test_the_models_own_graph_gets_a_calibrated_width_used_by_the_service_and_sql(
    session: Session, settings: Settings
) -> None:
    """Mode `ann` walks the per-model graph at the width search sync measured on members of the whole model
    (not IMSRC_SEARCH_EF_SEARCH), and imsrc.search walks it equally wide; drift and turning it off as for the
    categories."""
    cat = make_catalog(session, n_categories=3, per_category=400, dimension=64, name="walks-ann", spread=0.8)
    tuned = _tuned(settings, search_ef_search=300)
    report = sync_search(session, tuned, model_id=cat.model.id)
    assert report.ann_calibrated
    stored = SearchStateRepository(session).get(ann_key(cat.model.id))
    assert stored["ef"] in LADDER and stored["rows"] == 1200 and stored["samples"] == ann_samples(1200) == SAMPLES
    assert stored["recall"] >= TARGET and stored["target"] == TARGET
    # Measured independently against NumPy: the stored width reaches the target on the sampled members.
    neighbours = NeighbourRepository(session)
    found = []
    for image_id, query in neighbours.sample_members(cat.model.id, None, ann_samples(1200)):
        row = int(np.flatnonzero(cat.image_ids == image_id)[0])
        others = np.ones(len(cat.image_ids), dtype=bool)
        others[row] = False
        truth = set(brute_force(cat.vectors, cat.image_ids, cat.vectors[row], K, others))
        walked = neighbours.global_ann(cat.model.id, 64, query, LIMIT, stored["ef"])
        found.append(len(truth & {i for i, _ in walked if i != image_id}) / K)
    assert np.mean(found) >= TARGET - 0.0025
    assert stored["ef"] < 300  # narrower than the setting it replaces

    runtime = SearchRuntime.create(tuned)
    assert runtime.ann_ef(session, cat.model.id) == stored["ef"]
    sql = "SELECT imsrc._ann_ef(:m, 300)"
    assert session.execute(text(sql), {"m": cat.model.id}).scalar() == stored["ef"]
    # The SQL function walks at that width: imsrc.search in mode ann answers as the service does.
    q = vector_literal(cat.vectors[5])
    via_sql = (
        session.execute(
            text("SELECT image_id FROM imsrc.search(CAST(:q AS vector), 10, NULL, 'ann', :n)"),
            {"q": q, "n": cat.model.name},
        )
        .scalars()
        .all()
    )
    via_service = runtime.service(session).search_vector(cat.model, cat.vectors[5], SearchOptions(k=10, mode="ann"))
    assert list(via_sql) == [h.id for h in via_service.results]

    assert sync_search(session, tuned, model_id=cat.model.id).ann_calibrated is False  # nothing changed
    # A width fitted on fewer members than a graph of its size now gets (an earlier release's) is fitted again.
    SearchStateRepository(session).put(ann_key(cat.model.id), {**stored, "samples": SAMPLES - 1})
    assert sync_search(session, tuned, model_id=cat.model.id).ann_calibrated
    assert SearchStateRepository(session).get(ann_key(cat.model.id))["samples"] == SAMPLES
    # One member per thousand rows, within [SAMPLES, ANN_SAMPLES]: a 1M graph's rare lost walks are measurable.
    assert [ann_samples(n) for n in (1200, 100_000, 1_000_000, 10_000_000)] == [SAMPLES, 100, 1000, ANN_SAMPLES]
    off = _tuned(settings, search_walk_recall=0.0)
    assert sync_search(session, off, model_id=cat.model.id).ann_calibrated is False
    assert SearchStateRepository(session).get(ann_key(cat.model.id)) == {}
    assert session.execute(text(sql), {"m": cat.model.id}).scalar() == 300
    assert SearchRuntime.create(off).ann_ef(session, cat.model.id) == off.search_ef_search


def test_the_streamed_exact_answers_match_the_sql_exact_scan(session: Session) -> None:
    """The global graph's calibration takes its exact answers from one streamed pass over the vectors (200 queries
    at 1M rows: one read of the table instead of 200 scans): the same ids and scores as the SQL exact scan, in
    batches that split the rows anywhere, with equal vectors, a zero vector and ties ordered by id."""
    cat = make_catalog(session, n_categories=2, per_category=300, dimension=48, name="exact-top", spread=0.6)
    extra = cat.vectors[:3].copy()
    extra[2] = 0.0  # no cosine: never ranked
    ids = insert_images(session, cat.model, extra, [cat.category_ids[0]] * 3, salt="exact-top-extra").tolist()
    neighbours = NeighbourRepository(session)
    rows = range(0, 600, 50)
    members = [(int(cat.image_ids[r]), vector_literal(cat.vectors[r])) for r in rows]
    members.append((ids[0], vector_literal(extra[0])))
    queries = np.array([*cat.vectors[list(rows)], extra[0]], dtype=np.float32)
    stream = VectorRepository(session).stream(cat.model.id, 48, batch_rows=77)
    batches = list(stream)
    assert sum(len(b[0]) for b in batches) == 603 and len(batches) > 3
    assert ids[2] in np.concatenate([b[0] for b in batches])  # streamed, but never ranked
    got = exact_top(batches, queries, LIMIT)
    for (_, query), top in zip(members, got, strict=True):
        want = neighbours.exact(cat.model.id, query, LIMIT, None)
        assert [i for i, _ in top] == [i for i, _ in want]
        assert np.allclose([s for _, s in top], [s for _, s in want], atol=1e-6)
    # A copy and its original score the same: ordered by id, both in the answer.
    first = got[-1]
    assert [i for i, _ in first[:2]] == sorted([ids[0], int(cat.image_ids[0])])


def test_a_global_fit_is_redone_for_too_few_samples_not_for_every_thousand_rows() -> None:
    fit = {"ef": 16, "rows": 100_000, "recall": 0.995, "samples": 100, "target": 0.99}
    # Growth within DRIFT keeps the fit, although a graph of today's size would now be sampled more.
    assert not _stale(fit, 100_999, 0.99, ann_samples)
    assert not _stale(fit, 180_000, 0.99, ann_samples)
    assert _stale(fit, 200_001, 0.99, ann_samples)  # DRIFT
    # A fit made on fewer members than its own rows called for (an earlier release's 40 at 100k) is redone.
    assert _stale({**fit, "samples": 40}, 100_000, 0.99, ann_samples)
    assert not _stale({**fit, "samples": 40}, 100_000, 0.99)  # per-category fits: no sample rule
    small = {"ef": 16, "rows": 30, "recall": 1.0, "samples": 30, "target": 0.99}
    assert not _stale(small, 30, 0.99, ann_samples)  # every member of a tiny graph was sampled


def _binary_copy(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """What COPY (image_id, embedding) TO STDOUT (FORMAT BINARY) sends for these rows."""
    d = vectors.shape[1]
    out = bytearray(b"PGCOPY\n\xff\r\n\x00" + bytes(8))
    for i, v in zip(ids.tolist(), vectors, strict=True):
        out += (2).to_bytes(2, "big", signed=True) + (8).to_bytes(4, "big") + int(i).to_bytes(8, "big", signed=True)
        out += (4 + 4 * d).to_bytes(4, "big") + d.to_bytes(2, "big") + bytes(2) + v.astype(">f4").tobytes()
    return bytes(out + b"\xff\xff")


def test_the_copy_stream_is_parsed_whatever_its_chunks() -> None:
    rng = np.random.default_rng(5)
    for n in (0, 1, 5, 17, 100):
        ids = rng.integers(1, 2**40, n)
        vectors = rng.standard_normal((n, 6)).astype(np.float32)
        stream = _binary_copy(ids, vectors)
        for _ in range(5):
            cuts = sorted(rng.choice(np.arange(1, len(stream)), size=min(40, len(stream) - 1), replace=False))
            chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
            got = list(copy_batches(chunks, 6, batch_rows=4))
            assert all(len(i) for i, _ in got)
            assert np.concatenate([i for i, _ in got] or [np.zeros(0, np.int64)]).tolist() == ids.tolist()
            if n:
                assert np.array_equal(np.concatenate([v for _, v in got]), vectors)
    with pytest.raises(ValueError, match="cut short"):
        list(copy_batches([_binary_copy(np.arange(3), np.ones((3, 6), np.float32))[:-7]], 6, 4))
    with pytest.raises(ValueError, match="6-dimensional"):
        list(copy_batches([_binary_copy(np.arange(3), np.ones((3, 5), np.float32))], 6, 1))
