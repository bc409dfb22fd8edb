"""Re-grouping near-duplicates from stored perceptual hashes (no decoding, no re-embedding)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from imsrc.ingest.phash import PhashIndex
from imsrc.ingest.repository import DuplicateRepository, IngestRepository

UPDATE_CHUNK = 10_000


def recompute_duplicates(session: Session, threshold: int) -> dict[str, int]:
    """Walk images in id order; each one points at the earliest canonical image within `threshold`, or
    becomes canonical itself. The same rule as at ingest time, so the result equals indexing afresh with
    that threshold. Does not commit. Cost: one pass, each image compared with the canonical hashes so far
    (numpy XOR + popcount)."""
    repo = DuplicateRepository(session)
    index = PhashIndex(threshold)
    changes: list[tuple[int, int | None]] = []
    changed = 0
    for image_id, value, current in list(repo.all_hashes()):
        canonical = index.match(value)
        if canonical is None:
            index.add(image_id, value)
        if canonical != current:
            changes.append((image_id, canonical))
        if len(changes) >= UPDATE_CHUNK:
            IngestRepository(session).set_canonical(changes)
            changed += len(changes)
            changes = []
    IngestRepository(session).set_canonical(changes)
    changed += len(changes)
    return {**repo.counts(), "changed": changed, "threshold": threshold}
