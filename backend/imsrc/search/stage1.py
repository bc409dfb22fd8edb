"""Stage 1: score the query against every prototype of the model (a small in-memory matrix) and pick
categories. The matrix is reloaded only when the prototypes or category names change (a cheap version query)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository
from imsrc.search.calibration import FIXED_TEMPERATURE, state_key
from imsrc.search.repository import SearchStateRepository

# Softmax temperature when none is calibrated or set: a 0.05 cosine gap is about a factor e in weight.
STAGE1_TEMPERATURE = FIXED_TEMPERATURE


@dataclass(frozen=True)
class CategoryScore:
    category_id: int
    name: str
    score: float


@dataclass(frozen=True)
class PrototypeMatrix:
    model_id: int
    version: tuple[Any, ...]
    matrix: np.ndarray  # (P, d) unit rows
    owners: np.ndarray  # (P,) category id of each row
    names: dict[int, str]
    calibrated: float | None = None  # the temperature fitted at sync time (search/calibration.py), if any

    def temperature(self, fixed: float = 0.0) -> float:
        """The rule's temperature: `fixed` when > 0 (IMSRC_SEARCH_STAGE1_TEMPERATURE), else the calibrated one,
        else the old fixed 0.05."""
        return fixed if fixed > 0 else (self.calibrated or STAGE1_TEMPERATURE)

    @property
    def category_count(self) -> int:
        return len(self.names)

    def score(self, query: np.ndarray) -> list[CategoryScore]:
        """Every category with prototypes, best first; a category scores its best prototype."""
        if len(self.owners) == 0:
            return []
        sims = self.matrix @ np.asarray(query, dtype=np.float32)
        best: dict[int, float] = {}
        for owner, sim in zip(self.owners.tolist(), sims.tolist(), strict=True):
            if sim > best.get(owner, -2.0):
                best[owner] = sim
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
        return [CategoryScore(c, self.names.get(c, str(c)), s) for c, s in ranked]


def choose(
    ranked: list[CategoryScore],
    *,
    count: int | None,
    mass: float,
    cap: int | None = None,
    temperature: float = STAGE1_TEMPERATURE,
) -> list[CategoryScore]:
    """Exactly the top `count` categories; or (count None) as many as cover `mass` of the softmax score
    mass, at most `cap`. The mass rule is what keeps a confident query to one category: at 1M vectors each
    extra 10,000-row category costs pgvector about as much as the first (bench/search)."""
    if not ranked:
        return []
    if count is not None:
        return ranked[:count]
    if mass >= 1.0:  # all of the mass: every category, up to the cap (tiny weights underflow to 0 otherwise)
        n = len(ranked)
    else:
        scores = np.array([c.score for c in ranked], dtype=np.float64) / temperature
        weights = np.exp(scores - scores.max())
        cumulative = np.cumsum(weights / weights.sum())
        n = int(np.searchsorted(cumulative, mass - 1e-12) + 1)
    return ranked[: max(1, min(n, len(ranked), cap or len(ranked)))]


def pick(
    ranked: list[CategoryScore],
    requested: int | str | None,
    *,
    mass: float,
    cap: int,
    temperature: float = STAGE1_TEMPERATURE,
) -> list[CategoryScore]:
    """The service's stage-1 rule: a number searches exactly that many categories; 'auto' follows the score
    mass alone; None (the default) follows it up to `cap` (IMSRC_SEARCH_CATEGORIES)."""
    if requested == "auto":
        return choose(ranked, count=None, mass=mass, temperature=temperature)
    if requested is not None:
        return choose(ranked, count=int(requested), mass=mass)
    return choose(ranked, count=None, mass=mass, cap=cap, temperature=temperature)


class PrototypeCache:
    """One matrix per model, shared by all requests; thread-safe, reloaded when the version moves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, PrototypeMatrix] = {}
        self.loads = 0

    def get(self, session: Session, model_id: int, version: tuple[Any, ...] | None = None) -> PrototypeMatrix:
        """`version`: PrototypeRepository.version read by this unit of work already (folded into its first
        statement), else it is read here."""
        repo = PrototypeRepository(session)
        version = version if version is not None else repo.version(model_id, state_key(model_id))
        with self._lock:
            hit = self._items.get(model_id)
        if hit is not None and hit.version == version:
            return hit
        rows = repo.load(model_id, ("mean", "cluster"))
        names = CategoryRepository(session).names({r.category_id for r in rows})
        rows = [r for r in rows if r.category_id in names]
        dimension = len(rows[0].vector) if rows else 0
        matrix = PrototypeMatrix(
            model_id=model_id,
            version=version,
            matrix=np.stack([r.vector for r in rows]).astype(np.float32) if rows else np.zeros((0, dimension)),
            owners=np.array([r.category_id for r in rows], dtype=np.int64),
            names=names,
            calibrated=SearchStateRepository(session).get(state_key(model_id)).get("temperature"),
        )
        with self._lock:
            self._items[model_id] = matrix
            self.loads += 1
        return matrix
