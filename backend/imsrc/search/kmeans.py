"""Spherical k-means in NumPy: small, deterministic, good enough for a few thousand vectors per category."""

from __future__ import annotations

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def spherical_kmeans(x: np.ndarray, k: int, *, iterations: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors by cosine similarity. Returns (unit centres (k, d), labels (n,)).

    k-means++ seeding with a fixed seed, so the same members always give the same prototypes.
    """
    n = len(x)
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(n)]
    closest = 1.0 - x @ centres[0]
    for j in range(1, k):
        weights = np.maximum(closest, 0.0) ** 2
        total = float(weights.sum())
        idx = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centres[j] = x[idx]
        closest = np.minimum(closest, 1.0 - x @ centres[j])
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iterations):
        new_labels = np.argmax(x @ centres.T, axis=1)
        if it > 0 and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = normalise(members.sum(axis=0))
            else:  # an empty cluster restarts on the point worst served by the others
                worst = int(np.argmin(np.max(x @ centres.T, axis=1)))
                centres[j] = x[worst]
    return centres, labels


def cohesion(x: np.ndarray, centres: np.ndarray) -> float:
    """Mean cosine similarity of each vector to its nearest centre (1.0 = every member on a centre)."""
    return float(np.mean(np.max(x @ centres.T, axis=1)))
