"""Per-category walk widths (pgvector hnsw.ef_search), calibrated on each category's own members.

Why: until this module a walk through a category's graph was at least 2 sqrt(rows) wide (and at least
IMSRC_SEARCH_EF_SEARCH), a rule fitted on isotropic 512-d data where every row of a category is nearly tied with
every other. Real embeddings have structure the graph can follow: on 500k Fashion-MNIST-calibrated EfficientNet
vectors (10 categories of 50k) the rule walked each category at ef 448, 17.6 ms for one category, while the
global graph over all 500k reached recall@10 1.000 at ef 40 (BENCHMARKS.md, bench/search/service_bench.py).

So when search sync finds a category's index uncalibrated (new, or its rows doubled or halved since), it
searches up to SAMPLES of the category's members through the very statement stage 2 runs
(NeighbourRepository.per_category, each member left out of its own answer), at widening ef, against the
category's exact top K, and keeps the narrowest ef whose mean recall reaches IMSRC_SEARCH_WALK_RECALL. Between
calibrations the width grows with sqrt(rows / rows at calibration) (pg_queries.calibrated_ef).

The widths live in search_state under walks:m<model id> ({category id: {ef, rows, recall, samples, target}}),
where the service (SearchRuntime.walk_widths) and the SQL functions (imsrc._walk_ef, migration 0015) both read
them, so both walk equally wide. IMSRC_SEARCH_WALK_RECALL=0 turns calibration off and drops the stored widths:
every category then follows the size rule again.

The model's own graph over every image (mode `ann`, and every two-stage query stage 1 does not narrow) is
calibrated the same way on members of the whole model (ann_samples: more for a bigger graph; their exact
answers from one streamed pass over the vectors), under walks:m<model id>:ann (imsrc._ann_ef, migration 0016).
Why: it was walked at IMSRC_SEARCH_EF_SEARCH (100) whatever the data; at 1M real-calibrated vectors ef 40 reached
recall@10 1.000 and walked in 5.9 ms where ef 100 took 87 ms (pages beyond shared_buffers). Without a calibration
(new graph, calibration off) it is walked at IMSRC_SEARCH_EF_SEARCH as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from imsrc.catalog.locks import WriteLocks
from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import ModelRepository
from imsrc.config import Settings
from imsrc.db.citus import distributed
from imsrc.db.engine import side_engine
from imsrc.search.pg_queries import (
    EF_SEARCH_MAX,
    HALFVEC_MAX_DIM,
    Hit,
    NeighbourRepository,
    WalkWidth,
    walk_settings,
)
from imsrc.search.repository import SearchStateRepository, VectorRepository

# Widths tried, narrowest first. Below the statement's LIMIT (16 for the default k) a width changes nothing
# (walk_settings raises ef_search to the limit), so the ladder starts there.
LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, EF_SEARCH_MAX)
SAMPLES = 40  # members searched per category: 400 neighbours, so recall is known to about +-0.005 at 0.99
# Members searched through the model's own graph: one per thousand rows, at least SAMPLES, at most ANN_SAMPLES.
# Its misses come as whole queries whose walk ends in the wrong part of the graph (recall 0 for that query), not as
# one neighbour in a hundred: at 1M real-calibrated rows 200 members all reached recall 1.000 at ef 16 while 3 of
# the benchmark's 200 queries found none of their neighbours there (0.985, under the 0.99 target). Told apart
# from the target, a miss rate of 1.5 % needs about a thousand samples (standard error 0.004). Their exact answers
# come from one streamed pass over the vectors (exact_top), not a scan each.
ANN_SAMPLES = 1000


def ann_samples(rows: int) -> int:
    """Members the model's own graph is calibrated on, for a graph of `rows` rows."""
    return max(SAMPLES, min(ANN_SAMPLES, rows // 1000))


K = 10  # the API's default k, with the service's margin for skipped duplicates and the member itself
LIMIT = K + max(5, K // 2) + 1
DRIFT = 2.0  # calibrate again when a category's rows have grown or shrunk by this factor
TIE = 1e-6  # a walk's row scoring with the exact k-th (equal vectors) counts as found


def state_key(model_id: int) -> str:
    return f"walks:m{int(model_id)}"


def ann_key(model_id: int) -> str:
    """The model's own graph's width (not a category id, so widths() and imsrc._walk_ef never read it)."""
    return f"walks:m{int(model_id)}:ann"


@dataclass(frozen=True)
class WalkFit:
    ef: int
    rows: int
    recall: float
    samples: int
    target: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def width(value: Any) -> WalkWidth | None:
    """One stored fit as pg_queries reads it; None where there is none (or one this release cannot read)."""
    try:
        return WalkWidth(int(value["ef"]), int(value["rows"]), float(value.get("recall", 1.0)))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def widths(stored: Mapping[str, Any]) -> dict[int, WalkWidth]:
    """search_state's value for a model, as pg_queries reads it."""
    out = {}
    for key, value in stored.items():
        found = width(value) if str(key).isdigit() else None
        if found is not None:  # else written by another release: the size rule applies until calibrated again
            out[int(key)] = found
    return out


def _entries(stored: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    """search_state's value by category id, without entries this release cannot read (another release's, or
    edited by hand): those count as missing, are calibrated again and dropped when the widths are rewritten,
    instead of failing every search sync."""
    return {int(key): value for key, value in stored.items() if str(key).isdigit() and isinstance(value, Mapping)}


def _stale(
    entry: Mapping[str, Any] | None, rows: int, target: float, samples: Callable[[int], int] | None = None
) -> bool:
    """Whether a stored fit is to be made again: none, another target, rows grown or shrunk by DRIFT, or (with
    `samples`, members wanted for a graph of n rows) measured on fewer members than this release would have taken
    for the rows it was fitted on (a width an earlier release fitted on 40 members of a 1M graph). Judged on the
    fit's own rows, not today's: growth alone is DRIFT's to judge, or every thousand new rows would refit."""
    try:
        if not entry or "ef" not in entry or float(entry.get("target", -1)) != target:
            return True
        then = max(int(entry.get("rows", 0)), 1)
        if samples is not None and int(entry.get("samples", 0)) < min(samples(then), then):
            return True
    except (TypeError, ValueError):
        return True
    return not (1 / DRIFT < max(rows, 1) / then < DRIFT)


def ann_due(session: Session, settings: Settings, model: EmbeddingModel) -> bool:
    """Whether the model's own graph's width is missing or out of date (or a stored one is to be dropped)."""
    stored = SearchStateRepository(session).get(ann_key(model.id))
    rows = NeighbourRepository(session).global_index_rows(model.id)
    if settings.search_walk_recall <= 0 or rows is None:
        return bool(stored)
    return _stale(stored, rows, settings.search_walk_recall, ann_samples)


def due(session: Session, settings: Settings, model: EmbeddingModel) -> list[int]:
    """Indexed categories whose width is missing or out of date (or stored widths to drop)."""
    target = settings.search_walk_recall
    stored = _entries(SearchStateRepository(session).get(state_key(model.id)))
    if target <= 0 or model.dimension > HALFVEC_MAX_DIM:
        return sorted(stored)
    indexed = NeighbourRepository(session).category_indexes(model.id)
    gone = [c for c in stored if c not in indexed]
    return sorted(set(gone) | {c for c, rows in indexed.items() if _stale(stored.get(c), rows, target)})


def calibrate_walks(session: Session, settings: Settings, model: EmbeddingModel) -> dict[int, WalkFit]:
    """Calibrate every due category of the model and store the widths; the categories fitted by this call."""
    if not due(session, settings, model):
        return {}
    # The per-model index lock (catalog.locks order: after categories and text prompts, before predictions):
    # no index is built or dropped meanwhile, and two syncs do not both rewrite the widths.
    WriteLocks(session).indexes(model.id)
    state = SearchStateRepository(session)
    raw = state.get(state_key(model.id))
    stored = _entries(raw)
    target = settings.search_walk_recall
    if target <= 0 or model.dimension > HALFVEC_MAX_DIM:
        if raw:
            state.put(state_key(model.id), {})
        return {}
    indexed = NeighbourRepository(session).category_indexes(model.id)
    kept: dict[str, Any] = {str(c): value for c, value in stored.items() if c in indexed}
    todo = [(c, rows) for c, rows in sorted(indexed.items()) if _stale(stored.get(c), rows, target)]
    fitted: dict[int, WalkFit] = {}
    with _reader(session) as (neighbours, in_session):
        measurable = set(neighbours.category_indexes(model.id)) if not in_session else set(indexed)
        for category_id, rows in todo:
            if category_id not in measurable:
                continue  # built by this unit of work on Citus: measured by the next sync, once committed
            fit = fit_category(neighbours, model, category_id, rows, target, in_session=in_session)
            if fit is not None:
                fitted[category_id] = fit
                kept[str(category_id)] = fit.as_dict()
    if kept != raw:
        state.put(state_key(model.id), kept)
    return fitted


def calibrate_ann(session: Session, settings: Settings, model: EmbeddingModel) -> WalkFit | None:
    """Calibrate the model's own graph when due and store its width; the fit made by this call, if any."""
    if not ann_due(session, settings, model):
        return None
    WriteLocks(session).indexes(model.id)  # as calibrate_walks: no build or drop meanwhile, one writer
    # Read again under the lock: a sync this one waited for may have fitted (or dropped) it meanwhile.
    state = SearchStateRepository(session)
    stored = state.get(ann_key(model.id))
    rows = NeighbourRepository(session).global_index_rows(model.id)
    if settings.search_walk_recall <= 0 or rows is None:
        if stored:
            state.put(ann_key(model.id), {})
        return None
    if not _stale(stored, rows, settings.search_walk_recall, ann_samples):
        return None
    with _reader(session) as (neighbours, in_session):
        if not in_session and neighbours.global_index_rows(model.id) is None:
            return None  # built by this unit of work on Citus: measured by the next sync, once committed
        fit = fit_ann(neighbours, model, rows, settings.search_walk_recall)
    if fit is not None:
        state.put(ann_key(model.id), fit.as_dict())
    return fit


@contextmanager
def _reader(session: Session) -> Iterator[tuple[NeighbourRepository, bool]]:
    """Where the calibration's reads run. Plain PostgreSQL: in this unit of work, which sees the indexes it has
    just built. Citus: on a connection of its own, which sees only committed indexes. Reading the shards inside a
    unit of work that has written to Citus-local tables left the transaction unable to read them together again
    ("cannot switch local execution status"), and stage 2 reads there on connections of their own anyway."""
    if not distributed(session):
        yield NeighbourRepository(session), True
        return
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    with Session(side_engine(engine)) as side:
        try:
            yield NeighbourRepository(side), False
        finally:
            side.rollback()


def fit_category(
    neighbours: NeighbourRepository,
    model: EmbeddingModel,
    category_id: int,
    rows: int,
    target: float,
    *,
    in_session: bool = True,
) -> WalkFit | None:
    """The narrowest ladder width reaching `target`; None when the category cannot be measured now (too few
    members, or its index is not usable in this transaction: the next sync tries again)."""
    members = neighbours.sample_members(model.id, category_id, SAMPLES)
    if len(members) < 2 or not neighbours.walks_index(model.id, model.dimension, category_id, members[0][1], LIMIT):
        return None

    def exact(query: str) -> list[Hit]:
        return neighbours.per_category(
            model.id, model.dimension, query, [(category_id, False)], LIMIT, EF_SEARCH_MAX, in_session=in_session
        )

    def walk(query: str, ef: int) -> list[Hit]:
        # Full-precision scores (the walk's rows, scored as exact() scores them): overlap() counts a row outside
        # the exact answer as found only when tied with its k-th, which half-precision scores (~5e-5 off) fake.
        return neighbours.per_category(
            model.id, model.dimension, query, [(category_id, True)], LIMIT, ef, in_session=in_session, full_scores=True
        )

    return _fit(members, [exact(query) for _, query in members], walk, rows, target)


def fit_ann(neighbours: NeighbourRepository, model: EmbeddingModel, rows: int, target: float) -> WalkFit | None:
    """The narrowest ladder width at which the model's own graph reaches `target` on sampled members of the
    whole model, against the exact top K over every image (global_ann, the statement mode `ann` runs)."""
    members = neighbours.sample_members(model.id, None, ann_samples(rows))
    half = ModelRepository(neighbours.session).global_index_half(model.id) is not False
    if len(members) < 2 or not neighbours.global_walks_index(
        model.id, model.dimension, members[0][1], LIMIT, half=half
    ):
        return None
    queries = np.array([json.loads(query) for _, query in members], dtype=np.float32)
    truths = exact_top(VectorRepository(neighbours.session).stream(model.id, model.dimension), queries, LIMIT)
    return _fit(
        members,
        truths,
        lambda query, ef: neighbours.global_ann(model.id, model.dimension, query, LIMIT, ef, half=half),
        rows,
        target,
    )


def exact_top(batches: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, limit: int) -> list[list[Hit]]:
    """Each query's exact top `limit` by cosine similarity over (image ids, vectors) batches, best first (ties by
    id): what NeighbourRepository.exact answers, for many queries in one pass over the vectors. Zero vectors (no
    cosine: NaN in pgvector, sorted last) never rank."""
    q = queries.astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    best_s = np.empty((len(q), 0))
    best_i = np.empty((len(q), 0), dtype=np.int64)
    for ids, vectors in batches:
        v = vectors.astype(np.float64)
        norms = np.linalg.norm(v, axis=1)
        scores = (q @ v.T) / np.where(norms > 0, norms, 1.0)
        scores[:, norms == 0] = -np.inf
        best_s = np.concatenate([best_s, scores], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
        if best_s.shape[1] > limit:
            keep = np.argpartition(-best_s, limit - 1, axis=1)[:, :limit]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    out = []
    for s_row, i_row in zip(best_s, best_i, strict=True):
        ranked = sorted(zip(i_row.tolist(), s_row.tolist(), strict=True), key=lambda h: (-h[1], h[0]))
        out.append([(int(i), float(score)) for i, score in ranked if score != -np.inf])
    return out


def _fit(
    members: Sequence[tuple[int, str]],
    exact: Sequence[list[Hit]],
    walk: Callable[[str, int], list[Hit]],
    rows: int,
    target: float,
) -> WalkFit:
    """Widen the walk along LADDER until its mean recall of each member's exact top K (`exact`: each member's exact
    answer, the member itself left out here) reaches `target`; the widest when none does."""
    truths = [[h for h in found if h[0] != image_id][:K] for (image_id, _), found in zip(members, exact, strict=True)]
    recall = 0.0
    for ef in LADDER:
        found = [
            overlap([h for h in walk(query, ef) if h[0] != image_id][:K], truth)
            for (image_id, query), truth in zip(members, truths, strict=True)
        ]
        recall = sum(found) / len(found)
        if recall >= target:
            return WalkFit(_effective(ef), rows, round(recall, 4), len(members), target)
    return WalkFit(EF_SEARCH_MAX, rows, round(recall, 4), len(members), target)


def _effective(ef: int) -> int:
    """The width the statement really ran at (walk_settings raises it to the LIMIT)."""
    return int(walk_settings(ef, LIMIT)["hnsw.ef_search"])


def overlap(walked: Sequence[tuple[int, float]], truth: Sequence[tuple[int, float]]) -> float:
    """Share of the exact answer the walk found; rows tied with the exact k-th count (equal vectors)."""
    if not truth:
        return 1.0
    ids = {i for i, _ in truth}
    floor = truth[-1][1] - TIE
    return min(len(truth), sum(1 for i, s in walked if i in ids or s >= floor)) / len(truth)
