"""An in-process FAISS index per model: one sub-index per category (flat below settings.faiss_flat_max_rows,
HNSW above), so a category filter is a choice of sub-indexes rather than a post-filter (FAISS HNSW with an
IDSelector over 3 % of the rows returned 0.8 rows of 10 in the design probe).

Vectors are unit length and searched by inner product (= cosine). Deletions and category moves leave a
tombstone (filtered with an IDSelector, harmless while they are few); a sub-index with more than 20 %
tombstones is rebuilt from its own stored vectors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from imsrc.search.repository import Watermark

Hit = tuple[int, float]
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
COMPACT_FRACTION = 0.2


def _new_index(dimension: int, n: int, flat_max_rows: int) -> faiss.Index:
    if n < flat_max_rows:
        return faiss.IndexFlatIP(dimension)
    index = faiss.IndexHNSWFlat(dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


@dataclass
class SubIndex:
    index: faiss.Index
    ids: np.ndarray  # position -> image id
    removed: set[int] = field(default_factory=set)
    _selector: object | None = None

    @property
    def live(self) -> int:
        return len(self.ids) - len(self.removed)

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self.index, faiss.IndexHNSWFlat) else "flat"

    def vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal) if self.index.ntotal else np.zeros((0, self.index.d))

    def search(self, query: np.ndarray, limit: int, ef_search: int) -> list[Hit]:
        if self.live <= 0:
            return []
        want = min(limit, self.live)
        params: Any = None
        if self.removed:
            if self._selector is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self.removed, dtype=np.int64))
                self._selector = (batch, faiss.IDSelectorNot(batch))  # keep both alive for the C++ side
            sel = self._selector[1]  # type: ignore[index]
        else:
            sel = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(ef_search, want)
            if sel is not None:
                params.sel = sel
        elif sel is not None:
            params = faiss.SearchParameters()
            params.sel = sel
        scores, labels = self.index.search(query.reshape(1, -1), want, params=params)
        return [(int(self.ids[p]), float(s)) for p, s in zip(labels[0], scores[0], strict=True) if p >= 0]


class FaissModelIndex:
    """All sub-indexes of one model, plus where each image lives. Thread-safe."""

    def __init__(self, *, model_id: int, model_name: str, dimension: int, flat_max_rows: int,
                 watermark: Watermark) -> None:
        self.model_id = model_id
        self.model_name = model_name
        self.dimension = dimension
        self.flat_max_rows = flat_max_rows
        self.watermark = watermark  # which committed changes the index already holds
        self.subs: dict[int, SubIndex] = {}  # category id (-1 = none) -> sub-index
        self.where: dict[int, tuple[int, int]] = {}  # image id -> (category, position)
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.where)

    def category_sizes(self) -> dict[int, int]:
        return {c: s.live for c, s in self.subs.items()}

    def add_category(self, category_id: int, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk build of one category's sub-index (used by the initial build)."""
        index = _new_index(self.dimension, len(image_ids), self.flat_max_rows)
        if len(image_ids):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.subs[category_id] = SubIndex(index, np.asarray(image_ids, dtype=np.int64).copy())
        for pos, image_id in enumerate(image_ids.tolist()):
            self.where[image_id] = (category_id, pos)

    def apply(self, changed: list[int], image_ids: np.ndarray, category_ids: np.ndarray,
              vectors: np.ndarray) -> None:
        """Make the index match the database for `changed` images, given their current rows (absent = gone).

        Idempotent: applying the same change twice leaves the same state, so re-reading the change log from
        a conservative watermark is safe.
        """
        with self.lock:
            for image_id in changed:
                self._remove(image_id)
            by_category: dict[int, list[int]] = {}
            for row, category_id in enumerate(category_ids.tolist()):
                by_category.setdefault(category_id, []).append(row)
            for category_id, rows in by_category.items():
                self._append(category_id, image_ids[rows], vectors[rows])
            for category_id in list(self.subs):
                self._maybe_compact(category_id)

    def _remove(self, image_id: int) -> None:
        found = self.where.pop(image_id, None)
        if found is not None:
            sub = self.subs[found[0]]
            sub.removed.add(found[1])
            sub._selector = None

    def _append(self, category_id: int, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        sub = self.subs.get(category_id)
        if sub is None:
            self.add_category(category_id, image_ids, vectors)
            return
        start = len(sub.ids)
        sub.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        sub.ids = np.concatenate([sub.ids, image_ids.astype(np.int64)])
        for offset, image_id in enumerate(image_ids.tolist()):
            self.where[image_id] = (category_id, start + offset)
        if sub.kind == "flat" and sub.live >= self.flat_max_rows:
            self._rebuild(category_id)

    def _maybe_compact(self, category_id: int) -> None:
        sub = self.subs.get(category_id)
        if sub is not None and sub.removed and len(sub.removed) > COMPACT_FRACTION * len(sub.ids):
            self._rebuild(category_id)

    def _rebuild(self, category_id: int) -> None:
        sub = self.subs[category_id]
        keep = np.array([p for p in range(len(sub.ids)) if p not in sub.removed], dtype=np.int64)
        vectors = sub.vectors()[keep] if len(keep) else np.zeros((0, self.dimension), np.float32)
        for image_id in sub.ids[keep].tolist():
            self.where.pop(image_id, None)
        del self.subs[category_id]
        if len(keep):
            self.add_category(category_id, sub.ids[keep], vectors)

    def search(self, query: np.ndarray, category_ids: list[int] | None, limit: int, ef_search: int) -> list[Hit]:
        q = np.ascontiguousarray(query, dtype=np.float32)
        with self.lock:
            targets = list(self.subs) if category_ids is None else [c for c in category_ids if c in self.subs]
            hits: list[Hit] = []
            for c in targets:
                hits.extend(self.subs[c].search(q, limit, ef_search))
            if len(hits) < min(limit, sum(self.subs[c].live for c in targets)):
                hits = self._exact(q, targets)  # an HNSW walk came back short: k rows are promised
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits[:limit]

    def _exact(self, query: np.ndarray, targets: list[int]) -> list[Hit]:
        hits: list[Hit] = []
        for c in targets:
            sub = self.subs[c]
            live = np.array([p for p in range(len(sub.ids)) if p not in sub.removed], dtype=np.int64)
            if len(live):
                scores = sub.vectors()[live] @ query
                hits.extend(zip(sub.ids[live].tolist(), scores.tolist(), strict=True))
        return hits
