"""Where each image of a FAISS model index lives: image id -> (category, position in its sub-index).

A dict of Python ints and tuples costs ~150 bytes an image: ~0.15 GB at 1M images in every `serve` worker
(bench/load/memory.py). An index loaded from its saved files knows all locations at once, so they go into three
sorted NumPy arrays (16 bytes an image) looked up by binary search; what changes afterwards (the change log's
few images) lives in a small dict beside them, and a location taken back from the arrays is remembered in a set.
"""

from __future__ import annotations

import numpy as np

Location = tuple[int, int]


class Locations:
    def __init__(self) -> None:
        self._ids = np.zeros(0, np.int64)  # sorted image ids of the bulk part
        self._categories = np.zeros(0, np.int64)
        self._positions = np.zeros(0, np.int32)
        self._taken: set[int] = set()  # bulk entries popped since (their image moved or was deleted)
        self._extra: dict[int, Location] = {}

    def load(self, parts: list[tuple[int, np.ndarray]]) -> None:
        """Replace everything with `parts`: (category, image ids by position) per sub-index."""
        ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        categories = np.concatenate([np.full(len(p[1]), p[0], np.int64) for p in parts]) if parts else ids
        positions = np.concatenate([np.arange(len(p[1]), dtype=np.int32) for p in parts]) if parts else ids
        order = np.argsort(ids, kind="stable")
        self._ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        self._categories = np.ascontiguousarray(categories[order], dtype=np.int64)
        self._positions = np.ascontiguousarray(positions[order], dtype=np.int32)
        if len(self._ids) > 1 and bool((self._ids[1:] == self._ids[:-1]).any()):
            raise ValueError("an image id is in two sub-indexes")
        self._taken, self._extra = set(), {}

    def _bulk(self, image_id: int) -> int:
        """Row of `image_id` in the bulk arrays, or -1 (absent or taken)."""
        row = int(np.searchsorted(self._ids, image_id))
        if row < len(self._ids) and int(self._ids[row]) == image_id and image_id not in self._taken:
            return row
        return -1

    def pop(self, image_id: int) -> Location | None:
        found = self._extra.pop(image_id, None)
        if found is not None:
            return found
        row = self._bulk(image_id)
        if row < 0:
            return None
        self._taken.add(image_id)
        return int(self._categories[row]), int(self._positions[row])

    def __setitem__(self, image_id: int, location: Location) -> None:
        if self._bulk(image_id) >= 0:
            self._taken.add(image_id)  # the new location replaces the bulk one
        self._extra[image_id] = location

    def get(self, image_id: int) -> Location | None:
        found = self._extra.get(image_id)
        if found is not None:
            return found
        row = self._bulk(image_id)
        return None if row < 0 else (int(self._categories[row]), int(self._positions[row]))

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, int) and self.get(image_id) is not None

    def __len__(self) -> int:
        return len(self._ids) - len(self._taken) + len(self._extra)
