"""Stage-1 calibration: the softmax temperature of the score-mass rule, fitted on the catalog's own members.

A fixed temperature (0.05 until this module) means something different on every catalog: on well separated
categories it always picks one, on real ones whose prototypes sit close together (Fashion-MNIST through
EfficientNet-Lite0: shirts, T-shirts, pullovers and coats all within a few hundredths of cosine) it misses the
right category for some queries and spends the cap on others. So at sync time a sample of categorised members
is scored against every prototype, each member held out of its own category's prototypes, and the temperature
is the smallest (fewest categories searched) at which the rule still picks the member's own category for
`coverage` of the sample (IMSRC_SEARCH_STAGE1_COVERAGE).

With IMSRC_SEARCH_STAGE1_FALLBACK (the default) the rule is fitted without the cap: a query that needs more
than the cap is answered by `ann` over the whole model, so the coverage is reachable on any catalog and the
share of such queries is recorded (`over_cap`). Without it the cap cuts the rule, and where even the cap cannot
reach the target the fit is the smallest temperature with the best coverage the cap allows (the rule before:
on Fashion-MNIST that stopped at 0.974 and spent the cap on most queries).

The fitted value lives in search_state (key stage1:m<model id>), where the service's PrototypeCache and the SQL
function imsrc.search (migration 0012) both read it, so both keep picking the same categories.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.prototypes import PrototypeRepository, PrototypeRow
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.search.repository import STATE_KEY_PREFIX, SearchStateRepository, VectorRepository

# Used until a model has been calibrated (and the rule of releases before calibration).
FIXED_TEMPERATURE = 0.05
# Candidate temperatures, log-spaced: from "always one category" to "always the cap" on any real catalog.
GRID = np.geomspace(0.001, 1.0, 121)
SAMPLE = 2000  # held-out members scored per calibration: coverage known to about +-0.5 % at 0.98
# Recalibrate when the categorised members grew or shrank by this share since the last calibration.
DRIFT = 0.1


def state_key(model_id: int) -> str:
    return f"{STATE_KEY_PREFIX}{int(model_id)}"


@dataclass(frozen=True)
class Calibration:
    temperature: float
    coverage: float  # share of the held-out sample whose own category the rule picks at that temperature
    mean_categories: float  # categories the rule picks on average over the sample
    top1: float  # share whose own category scores best (the prototype classifier's accuracy)
    samples: int
    target: float
    mass: float
    cap: int
    members: int  # categorised vectors of the model when calibrated
    categories: int  # categories with prototypes when calibrated
    fallback: bool = False  # fitted for the rule that answers over-cap queries with `ann`
    over_cap: float = 0.0  # share of the sample whose rule wants more than the cap (answered by `ann`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def picked_counts(sorted_scores: np.ndarray, temperature: float, mass: float, cap: int) -> np.ndarray:
    """How many categories stage1.choose picks for each row of best-first scores (n, C): the first position
    where the softmax's cumulative weight reaches `mass`, between 1 and `cap`."""
    if mass >= 1.0:
        return np.full(len(sorted_scores), min(cap, sorted_scores.shape[1]))
    w = np.exp((sorted_scores - sorted_scores[:, :1]) / temperature)
    cumulative = np.cumsum(w, axis=1) / w.sum(axis=1, keepdims=True)
    n = (cumulative < mass - 1e-12).sum(axis=1) + 1
    return np.clip(n, 1, min(cap, sorted_scores.shape[1]))


def held_out_scores(
    vectors: np.ndarray, own: np.ndarray, prototypes: list[PrototypeRow], own_cosine: dict[tuple[int, int], float]
) -> tuple[np.ndarray, np.ndarray]:
    """(each member's score per category (n, C), the categories' ids (C,)): a category scores its best
    prototype, as stage1.PrototypeMatrix.score does; in its own category, the prototype the member belongs to
    is replaced by that prototype without the member. A prototype is the normalised sum of its members, and
    the sum's length is (members x their mean cosine to it), estimated from the sample (`own_cosine`)."""
    owners = np.array([p.category_id for p in prototypes], dtype=np.int64)
    matrix = np.stack([p.vector for p in prototypes]).astype(np.float32)
    sims = vectors @ matrix.T  # (n, P)
    categories = np.unique(owners)
    column = {int(c): j for j, c in enumerate(categories)}
    scores = np.full((len(vectors), len(categories)), -np.inf, dtype=np.float32)
    for j, c in enumerate(categories):
        scores[:, j] = sims[:, owners == c].max(axis=1)
    for i, c in enumerate(own.tolist()):
        mine = np.flatnonzero(owners == c)
        if len(mine) == 0:
            continue
        # The member belongs to its category's mean and to its nearest cluster centre (if any).
        clusters = [p for p in mine if prototypes[p].kind == "cluster"]
        belongs = {p for p in mine if prototypes[p].kind == "mean"}
        if clusters:
            belongs.add(clusters[int(np.argmax(sims[i, clusters]))])
        best = -np.inf
        for p in mine:
            row = prototypes[p]
            if p in belongs and row.member_count > 1:
                length = row.member_count * own_cosine.get((c, int(p)), 1.0)
                held = length * matrix[p] - vectors[i]
                norm = float(np.linalg.norm(held))
                score = float(held @ vectors[i]) / norm if norm > 0 else -1.0
            else:
                score = float(sims[i, p])
            best = max(best, score)
        scores[i, column[c]] = best
    return scores, categories


def fit(
    scores: np.ndarray, own_column: np.ndarray, *, mass: float, cap: int, target: float, fallback: bool = False
) -> dict[str, float]:
    """The smallest temperature on GRID whose coverage reaches `target` (or the best the cap allows).
    `fallback`: over-cap queries search everything, so the rule is counted without the cap (its coverage then
    reaches any target) and `over_cap` is the share that would fall back."""
    # Best first with ties by category id, as the service ranks (stage1.PrototypeMatrix.score).
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)
    ranked = np.take_along_axis(scores, order, axis=1).astype(np.float64)
    own_rank = np.argmax(order == own_column[:, None], axis=1)
    coverages, means, over = [], [], []
    for t in GRID:
        n = picked_counts(ranked, float(t), mass, scores.shape[1] if fallback else cap)
        coverages.append(float(np.mean(own_rank < n)))
        means.append(float(np.mean(n)))
        over.append(float(np.mean(n > cap)))
    reachable = min(target, max(coverages) - 1e-9)
    j = next(i for i, c in enumerate(coverages) if c >= reachable)
    return {
        "temperature": float(GRID[j]),
        "coverage": coverages[j],
        "mean_categories": means[j],
        "top1": float(np.mean(own_rank == 0)),
        "over_cap": over[j] if fallback else 0.0,
    }


def sample_members(session: Session, model: EmbeddingModel, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `size` categorised members drawn at random (fixed seed), by image id so no full scan is needed."""
    vectors = VectorRepository(session)
    low, high = vectors.id_range(model.id)
    if low is None or high is None:
        return np.zeros((0, model.dimension), np.float32), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    span = high - low + 1
    candidates = np.arange(low, high + 1) if span <= 4 * size else np.unique(rng.integers(low, high + 1, 4 * size))
    batch = vectors.fetch(model.id, model.dimension, image_ids=candidates.tolist())
    keep = np.flatnonzero(batch.category_ids >= 0)
    if len(keep) > size:
        keep = np.sort(rng.choice(keep, size, replace=False))
    return batch.vectors[keep], batch.category_ids[keep]


def calibrate(session: Session, settings: Settings, model: EmbeddingModel) -> Calibration | None:
    """Fit and store the model's stage-1 temperature; None (and nothing stored) with fewer than two categories."""
    names = CategoryRepository(session).names()
    protos = [p for p in PrototypeRepository(session).load(model.id, ("mean", "cluster")) if p.category_id in names]
    members = sum(p.member_count for p in protos if p.kind == "mean")
    categories = len({p.category_id for p in protos})
    if categories < 2:
        return None
    vectors, own = sample_members(session, model, SAMPLE)
    keep = np.isin(own, [p.category_id for p in protos])
    vectors, own = vectors[keep], own[keep]
    if len(own) == 0:
        return None
    own_cosine: dict[tuple[int, int], float] = {}
    for p, row in enumerate(protos):
        mine = own == row.category_id
        if mine.any():
            own_cosine[(row.category_id, p)] = float(np.mean(vectors[mine] @ row.vector))
    scores, cats = held_out_scores(vectors, own, protos, own_cosine)
    own_column = np.searchsorted(cats, own)
    fitted = fit(
        scores,
        own_column,
        mass=settings.search_score_mass,
        cap=settings.search_categories,
        target=settings.search_stage1_coverage,
        fallback=settings.search_stage1_fallback,
    )
    result = Calibration(
        **fitted,
        samples=len(own),
        target=settings.search_stage1_coverage,
        mass=settings.search_score_mass,
        cap=settings.search_categories,
        members=members,
        categories=categories,
        fallback=settings.search_stage1_fallback,
    )
    SearchStateRepository(session).put(state_key(model.id), result.as_dict())
    return result


def needs_calibration(session: Session, settings: Settings, model: EmbeddingModel) -> bool:
    """Never calibrated, the rule's settings changed, the categories changed, or the members drifted."""
    saved = SearchStateRepository(session).get(state_key(model.id))
    counts = PrototypeRepository(session).member_counts(model.id)
    if not saved:
        return len(counts) >= 2
    members = sum(counts.values())
    return (
        saved.get("target") != settings.search_stage1_coverage
        or bool(saved.get("fallback", False)) != settings.search_stage1_fallback
        or saved.get("mass") != settings.search_score_mass
        or saved.get("cap") != settings.search_categories
        or saved.get("categories") != len(counts)
        or abs(members - int(saved.get("members", 0))) > DRIFT * max(1, int(saved.get("members", 0)))
    )
