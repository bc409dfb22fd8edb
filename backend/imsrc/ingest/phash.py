"""Near-duplicate matching on 64-bit perceptual hashes, in memory with numpy.

Groups are stars: each image is compared with canonical images only (those that are not duplicates
themselves) and points at the earliest one within the threshold, so a group never chains A <- B <- C.
A brute-force XOR + popcount over all canonical hashes costs ~1 ms per 1M hashes per image; that is small
next to embedding, and exact (no candidate is missed, unlike an ANN index on the bits)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_MASK = (1 << 64) - 1


def to_signed(value: int) -> int:
    """Unsigned 64-bit hash -> the bigint PostgreSQL casts to bit(64) with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def to_unsigned(value: int) -> int:
    return value & _MASK


class PhashIndex:
    def __init__(self, threshold: int, rows: Iterable[tuple[int, int]] = ()) -> None:
        """rows: (image_id, unsigned hash) of canonical images, in any order."""
        self.threshold = threshold
        self._n = 0
        self._ids = np.empty(1024, dtype=np.int64)
        self._hashes = np.empty(1024, dtype=np.uint64)
        for image_id, value in rows:
            self.add(image_id, value)

    def __len__(self) -> int:
        return self._n

    def match(self, value: int) -> int | None:
        """The earliest (lowest id) canonical image within the threshold, if any."""
        if not self._n:
            return None
        close = np.bitwise_count(self._hashes[: self._n] ^ np.uint64(value)) <= self.threshold
        hits = self._ids[: self._n][close]
        return int(hits.min()) if len(hits) else None

    def add(self, image_id: int, value: int) -> None:
        if self._n == len(self._ids):  # capacity doubles: appends stay O(1) amortised on long jobs
            self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
            self._hashes = np.concatenate([self._hashes, np.empty_like(self._hashes)])
        self._ids[self._n] = image_id
        self._hashes[self._n] = np.uint64(value)
        self._n += 1


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
