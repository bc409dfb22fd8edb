"""Synthetic clustered catalogs for search tests: rows inserted directly (no images decoded), fast."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import CategoryRepository, ModelRepository, vector_literal
from imsrc.search.kmeans import normalise


@dataclass
class Synthetic:
    model: EmbeddingModel
    category_ids: list[int]
    image_ids: np.ndarray
    labels: np.ndarray  # index into category_ids, -1 = uncategorised
    vectors: np.ndarray
    centres: np.ndarray


def gaussian_mixture(
    n_categories: int, per_category: int, dimension: int, *, spread: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = normalise(rng.normal(size=(n_categories, dimension)))
    labels = np.repeat(np.arange(n_categories), per_category)
    noise = rng.normal(size=(len(labels), dimension)) * spread / np.sqrt(dimension)
    return normalise(centres[labels] + noise), labels, centres


def insert_images(
    session: Session, model: EmbeddingModel, vectors: np.ndarray, category_ids: list[int | None], *, salt: str = ""
) -> np.ndarray:
    """One images row and one embeddings row per vector; returns the image ids."""
    shas = [
        hashlib.sha256(f"{salt}-{i}-{vectors[i][:4].tobytes().hex()}".encode()).digest() for i in range(len(vectors))
    ]
    ids = (
        session.execute(
            text(
                "INSERT INTO images (sha256, width, height, format, byte_size, category_id) "
                "SELECT s, 8, 8, 'PNG', 100, c FROM unnest(CAST(:s AS bytea[]), CAST(:c AS bigint[])) "
                "WITH ORDINALITY AS v(s, c, o) ORDER BY o RETURNING id"
            ),
            {"s": shas, "c": category_ids},
        )
        .scalars()
        .all()
    )
    session.execute(
        text(
            "INSERT INTO embeddings (model_id, image_id, embedding) "
            "SELECT :m, i, CAST(e AS vector) FROM unnest(CAST(:i AS bigint[]), CAST(:e AS text[])) AS v(i, e)"
        ),
        {"m": model.id, "i": list(ids), "e": [vector_literal(v) for v in vectors]},
    )
    return np.asarray(ids, dtype=np.int64)


def make_catalog(
    session: Session,
    *,
    n_categories: int = 8,
    per_category: int = 150,
    dimension: int = 32,
    uncategorised: int = 0,
    seed: int = 0,
    name: str = "synthetic-test",
    spread: float = 0.35,
    supports_text: bool = False,
) -> Synthetic:
    models = ModelRepository(session)
    model = models.register(name=name, dimension=dimension, family="test", params={}, supports_text=supports_text)
    models.set_active(model)
    cats = CategoryRepository(session)
    category_ids = [cats.get_or_create(f"{name}-cat-{i:02d}").id for i in range(n_categories)]
    vectors, labels, centres = gaussian_mixture(n_categories, per_category, dimension, seed=seed, spread=spread)
    if uncategorised:
        extra, _, _ = gaussian_mixture(n_categories, uncategorised // n_categories + 1, dimension, seed=seed + 1)
        extra = extra[:uncategorised]
        vectors = np.concatenate([vectors, extra])
        labels = np.concatenate([labels, np.full(len(extra), -1)])
    cat_of = [None if lab < 0 else category_ids[lab] for lab in labels.tolist()]
    ids = insert_images(session, model, vectors, cat_of, salt=name)
    return Synthetic(model, category_ids, ids, labels, vectors, centres)


def brute_force(
    vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None
) -> list[int]:
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    order = np.lexsort((ids, -scores))[:k]
    return [int(ids[i]) for i in order if np.isfinite(scores[i])]
