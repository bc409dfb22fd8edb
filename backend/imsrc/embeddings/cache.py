"""Process-wide reuse: one loaded model per configuration, and an LRU of text query vectors."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

from imsrc.embeddings.base import Embedder


class EmbedderCache:
    """Builds each embedder at most once per process, lazily, safely from many threads.

    A per-key lock lets two different models load in parallel while concurrent requests for the
    same model wait for the single load instead of each loading their own copy.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._items: dict[Hashable, Embedder] = {}

    def get(self, key: Hashable, build: Callable[[], Embedder]) -> Embedder:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._items.get(key)
            if hit is not None:
                return hit
            embedder = build()  # a failure leaves nothing cached, so a later call retries
            with self._lock:
                self._items[key] = embedder
            return embedder

    def items(self) -> list[tuple[Hashable, Embedder]]:
        with self._lock:
            return list(self._items.items())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._key_locks.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class TextVectorCache:
    """LRU of text query vectors keyed by (model name, text): repeated searches skip the text tower."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, embedder: Embedder, text: str) -> np.ndarray:
        key = (embedder.name, text)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        # Encoded outside the lock so one slow query does not stall the others.
        vector = embedder.encode_texts([text])[0]
        vector.flags.writeable = False  # shared between callers: nobody may mutate it in place
        with self._lock:
            self._items[key] = vector
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return vector

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
