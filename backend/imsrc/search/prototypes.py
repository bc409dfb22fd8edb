"""Category prototypes: the normalised mean per (category, model), plus k-means centres for spread-out
categories, plus zero-shot text prototypes for CLIP-family models. Only touched categories are recomputed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.prototypes import PrototypeRepository, PrototypeRow
from imsrc.config import Settings
from imsrc.search.kmeans import cohesion, normalise, spherical_kmeans
from imsrc.search.repository import VectorRepository

# Fewer members than this per extra centre and a split is just fitting noise.
MIN_MEMBERS_PER_PROTOTYPE = 10
# k-means on more members than this runs on a fixed-seed sample: the centres barely move and it stays fast.
KMEANS_SAMPLE = 4000
TEXT_PROMPT = "a photo of a {name}"


def compute_prototypes(
    vectors: np.ndarray, *, max_prototypes: int, min_gain: float, category_id: int = 0
) -> list[PrototypeRow]:
    """The 'mean' row, plus 'cluster' rows when the members form several groups.

    How many centres: the smallest k after which one more centre raises the members' mean cosine to their
    nearest centre by less than `min_gain`, capped by `max_prototypes` and by size (>= 10 members each).
    """
    n = len(vectors)
    mean = normalise(vectors.sum(axis=0))
    rows = [PrototypeRow(category_id, "mean", 0, mean, n)]
    cap = min(max_prototypes, n // MIN_MEMBERS_PER_PROTOTYPE)
    if cap < 2:
        return rows
    sample = vectors
    if n > KMEANS_SAMPLE:
        sample = vectors[np.random.default_rng(0).choice(n, KMEANS_SAMPLE, replace=False)]
    best = (1, mean[None, :])
    previous = cohesion(sample, mean[None, :])
    for k in range(2, cap + 1):
        centres, _ = spherical_kmeans(sample, k, seed=k)
        current = cohesion(sample, centres)
        if current - previous < min_gain:
            break
        best, previous = (k, centres), current
    k, centres = best
    if k == 1:
        return rows
    labels = np.argmax(vectors @ centres.T, axis=1)
    for j in range(k):
        rows.append(PrototypeRow(category_id, "cluster", j, centres[j], int((labels == j).sum())))
    return rows


def refresh_prototypes(
    session: Session, settings: Settings, *, model_id: int, dimension: int, category_ids: Iterable[int]
) -> list[int]:
    """Recompute the prototypes of these categories only: their means for every model (a category's members
    changed for all of them), their k-means centres for this model. Returns the ids refreshed."""
    vectors = VectorRepository(session)
    protos = PrototypeRepository(session)
    done = sorted(set(category_ids))
    # The means are computed in PostgreSQL (pgvector's avg()); the k-means centres need the members here.
    protos.recompute_means(done)
    for category_id in done:
        batch = vectors.fetch(model_id, dimension, category_ids=[category_id])
        rows: list[PrototypeRow] = []
        if len(batch):
            rows = compute_prototypes(
                batch.vectors,
                max_prototypes=settings.max_prototypes,
                min_gain=settings.prototype_min_gain,
                category_id=category_id,
            )
        protos.replace(model_id, category_id, ("cluster",), [r for r in rows if r.kind == "cluster"])
    return done


def stale_categories(session: Session, model_id: int, existing: Iterable[int]) -> set[int]:
    """Categories whose member count no longer matches their mean prototype (e.g. changed by plain SQL)."""
    counts = {c: n for c, n in VectorRepository(session).category_counts(model_id).items() if c is not None}
    stored = PrototypeRepository(session).member_counts(model_id)
    wanted = set(existing)
    return {c for c in wanted if counts.get(c, 0) != stored.get(c, 0)}


def text_prototype_rows(names: dict[int, str], encode: object) -> list[PrototypeRow]:
    """'a photo of a {name}' through the model's text tower, one row per category."""
    ids = sorted(names)
    if not ids:
        return []
    texts = [TEXT_PROMPT.format(name=names[c]) for c in ids]
    matrix = np.asarray(encode(texts), dtype=np.float32)  # type: ignore[operator]
    return [PrototypeRow(c, "text", 0, normalise(matrix[i]), 0) for i, c in enumerate(ids)]


def predict(
    vectors: np.ndarray, prototypes: Sequence[PrototypeRow], *, logit_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Best category and a softmax confidence for each vector, from per-category best prototype scores."""
    owners = np.array([p.category_id for p in prototypes], dtype=np.int64)
    matrix = np.stack([p.vector for p in prototypes]).astype(np.float32)
    categories = np.unique(owners)
    sims = vectors @ matrix.T  # (n, P)
    per_category = np.full((len(vectors), len(categories)), -np.inf, dtype=np.float32)
    for j, c in enumerate(categories):
        per_category[:, j] = sims[:, owners == c].max(axis=1)
    logits = logit_scale * per_category
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    best = np.argmax(probs, axis=1)
    return categories[best], probs[np.arange(len(vectors)), best]
