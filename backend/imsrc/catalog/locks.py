"""Write locks: PostgreSQL advisory locks, each as narrow as correctness allows (issue 16, item 3).

Every one is transaction-scoped (pg_advisory_xact_lock), so it is released by the commit or rollback that ends the
unit of work, and what the holder wrote is visible to the next holder's statements (READ COMMITTED: each statement
sees what was committed before it began). A writer takes a lock before it *reads* what it will recompute, never
after, which is what makes the next holder see the previous one's result instead of overwriting it.

- Inserting images, thumbnails, bytes and vectors takes no lock: independent rows (identical bytes meet at the
  unique sha256 index, where the second insert waits for the first to commit).
- A category's prototypes (mean, k-means centres): one lock per category, taken in id order.
- Automatic categories: a per-model lock, shared by writers that only put their new images into existing
  groups, exclusive for the rare regrouping that deletes and re-creates them (and so names auto-NNN).
- Predicted labels, text prototypes and per-category indexes: one short per-model lock each, taken only when
  there is something to change, at the end of the unit of work. (Predicted labels are advisory: an upload of
  unlabelled images that read the prototypes just before another writer committed new ones keeps labels from
  the older set until the next change of labels re-predicts them.)
- New partitions of category_vectors (search/pg_queries.py): one lock, so that two models' index builds (the
  per-model index lock does not serialise them) never create the same category's partition twice. It costs no
  concurrency: ATTACH PARTITION already lets one transaction at a time add partitions until it commits. It is
  only tried, never waited for: a build that finds it taken leaves the category for the next sync.
- Near-duplicates of uploads: a lock per perceptual-hash band. Two hashes within the duplicate threshold t
  agree on at least one of t + 1 disjoint bands (pigeonhole), so two uploads of near-identical pictures always
  share a lock and the second one sees the first as its duplicate; unrelated pictures rarely do.

This replaced one catalog-wide lock (lock_catalog_writes) that every upload held from its first write to its
commit, so uploads into different categories queued behind each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.timings import stage

# The first key of pg_advisory_xact_lock(int, int): one class per kind of lock (727_002 is ingest's job lock).
CATEGORY = 727_010
AUTOGROUP = 727_011
PREDICTIONS = 727_012
TEXT_PROMPTS = 727_013
INDEXES = 727_014
PHASH_BAND = 727_015
CATEGORY_PARTITIONS = 727_016
_NAMES = {
    CATEGORY: "category",
    AUTOGROUP: "autogroup",
    PREDICTIONS: "predictions",
    TEXT_PROMPTS: "text_prompts",
    INDEXES: "indexes",
    PHASH_BAND: "phash",
}

_INT4 = 2_147_483_647


def _key(value: int) -> int:
    """A second key in int4 range (a collision only makes two writers take turns, never a wrong result)."""
    return int(value) % _INT4


def phash_band_keys(value: int, threshold: int) -> set[int]:
    """Lock keys for the threshold + 1 disjoint bands of a 64-bit hash (see the module doc)."""
    bands = max(1, min(64, threshold + 1))
    keys = set()
    start = 0
    for band in range(bands):
        width = (64 - start) // (bands - band)
        part = (int(value) >> start) & ((1 << width) - 1)
        keys.add(_key(hash((band, part))))
        start += width
    return keys


class WriteLocks:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _take(self, kind: int, keys: Iterable[int], *, shared: bool = False) -> None:
        ordered = sorted({_key(k) for k in keys})  # one order for every writer: no deadlock among these locks
        if not ordered:
            return
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        with stage(f"lock_{_NAMES.get(kind, kind)}"):  # waiting for another writer (Server-Timing of uploads)
            self.session.execute(
                text(f"SELECT count({function}(:c, k)) FROM (SELECT unnest(CAST(:k AS int[])) AS k ORDER BY 1) s"),
                {"c": kind, "k": ordered},
            )

    def categories(self, category_ids: Iterable[int]) -> None:
        self._take(CATEGORY, category_ids)

    def automatic_groups(self, model_id: int, *, regroup: bool) -> None:
        self._take(AUTOGROUP, [model_id], shared=not regroup)

    def predictions(self, model_id: int) -> None:
        self._take(PREDICTIONS, [model_id])

    def text_prompts(self, model_id: int) -> None:
        self._take(TEXT_PROMPTS, [model_id])

    def indexes(self, model_id: int) -> None:
        self._take(INDEXES, [model_id])

    def try_category_partitions(self) -> bool:
        """The new-partitions lock if it is free (held to the end of the transaction), else False at once."""
        return bool(
            self.session.execute(text("SELECT pg_try_advisory_xact_lock(:c, 0)"), {"c": CATEGORY_PARTITIONS}).scalar()
        )

    def phash_bands(self, hashes: Iterable[int], threshold: int) -> None:
        self._take(PHASH_BAND, [k for h in hashes for k in phash_band_keys(h, threshold)])
