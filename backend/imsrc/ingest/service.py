"""The one write path for new images, used by folder jobs (per batch) and uploads (ingest_bytes).

Nothing here commits. A batch is written inside the caller's transaction: image, thumbnail, embedding,
stored bytes, sources and the per-file record all land together or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.locks import WriteLocks
from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.embeddings.base import Embedder
from imsrc.imaging import DecodeGate
from imsrc.ingest.decode import DecodeOptions, Processed, WorkItem, process
from imsrc.ingest.phash import hamming, to_signed
from imsrc.ingest.repository import ExistingImage, IngestRepository, JobRepository
from imsrc.search.sync import only, sync_search
from imsrc.services.models import ModelService
from imsrc.timings import stage

OUTCOMES = ("new", "duplicate", "linked", "skipped", "failed")


class PhashMatcher(Protocol):
    threshold: int

    def match(self, value: int, before_id: int) -> int | None: ...


class SqlPhashMatcher:
    """For a handful of images (uploads): one indexed-free scan per image, no catalog-wide state."""

    def __init__(self, session: Session, threshold: int) -> None:
        self.session, self.threshold = session, threshold

    def match(self, value: int, before_id: int) -> int | None:
        return self.session.execute(
            text(
                "SELECT min(id) FROM images WHERE canonical_id IS NULL AND phash IS NOT NULL AND id < :b"
                " AND bit_count(phash # CAST(:p AS bigint)::bit(64)) <= :t"
            ),
            {"p": to_signed(value), "t": self.threshold, "b": before_id},
        ).scalar()


class IndexPhashMatcher:
    """For jobs: the in-memory index of committed canonical hashes (see phash.PhashIndex)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.threshold: int = index.threshold

    def match(self, value: int, before_id: int) -> int | None:
        return self.index.match(value)


@dataclass(slots=True)
class FileOutcome:
    key: str
    outcome: str
    reason: str | None = None
    image_id: int | None = None
    canonical_id: int | None = None
    category: str | None = None  # the category the file was sent with (known bytes keep the one they had)
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.key,
            "outcome": self.outcome,
            "reason": self.reason,
            "image_id": self.image_id,
            "duplicate_of": self.canonical_id,
            "category": self.category,
            "sha256": self.sha256,
        }


@dataclass(slots=True)
class BatchResult:
    outcomes: list[FileOutcome]
    counts: dict[str, int]
    touched_categories: set[int] = field(default_factory=set)
    new_canonicals: list[tuple[int, int]] = field(default_factory=list)  # (id, phash) to add after commit


@dataclass(slots=True)
class WriteContext:
    model_id: int
    store_bytes: bool
    matcher: PhashMatcher
    job_id: int | None = None


def ensure_model(session: Session, embedder: Embedder, settings: Settings) -> EmbeddingModel:
    """Register the embedder's model; the first model a catalog is indexed with becomes its active one."""
    return ModelService(session, settings).register(embedder)


def write_batch(
    session: Session, ctx: WriteContext, batch: Sequence[Processed], existing: dict[bytes, ExistingImage] | None = None
) -> BatchResult:
    """existing: the batch's digests already in the catalog, when the caller has just looked them up."""
    repo = IngestRepository(session)
    outcomes: dict[int, FileOutcome] = {}
    counts = dict.fromkeys(OUTCOMES, 0)
    ok = [(n, p) for n, p in enumerate(batch) if p.ok and p.sha256 is not None]
    for n, p in enumerate(batch):
        if not p.ok:
            outcomes[n] = FileOutcome(p.key, "failed", p.reason, category=p.category)
    if existing is None:
        existing = repo.existing_by_sha([p.sha256 for _, p in ok if p.sha256], ctx.model_id)
    known = repo.known_sources([p.key for _, p in ok if p.path is not None])

    fresh: list[tuple[int, Processed]] = []
    first_of_sha: dict[bytes, int] = {}
    for n, p in ok:
        assert p.sha256 is not None
        if p.sha256 in existing or p.sha256 in first_of_sha:
            continue
        first_of_sha[p.sha256] = n
        fresh.append((n, p))
    # A category is made only for images that will be in it: new ones, and catalogued ones without a category
    # (they adopt it). Known bytes sent again under another name stay where they are, and nothing is created.
    wanted: set[str | None] = set()
    for n, p in ok:
        old = existing.get(p.sha256) if p.sha256 is not None else None
        if p.category and (first_of_sha.get(p.sha256 or b"") == n or (old is not None and old.category_id is None)):
            wanted.add(p.category)
    categories = _category_ids(session, wanted)
    inserted = repo.insert_images([_image_row(p, categories) for _, p in fresh])
    if len(inserted) < len(fresh):  # another writer (an upload) stored some of them meanwhile
        existing.update(
            repo.existing_by_sha([p.sha256 for _, p in fresh if p.sha256 and p.sha256 not in inserted], ctx.model_id)
        )

    result = BatchResult([], counts)
    blobs: list[tuple[int, bytes]] = []
    thumbs: list[tuple[int, bytes, int, int]] = []
    vectors: list[tuple[int, np.ndarray]] = []
    canonical: list[tuple[int, int | None]] = []
    adopt_category: list[tuple[int, int]] = []
    first_new = min(inserted.values(), default=0)
    batch_canonicals: list[tuple[int, int]] = []
    for n, p in ok:
        assert p.sha256 is not None
        category_id = categories.get(p.category.strip().lower()) if p.category else None
        image_id = inserted.get(p.sha256)
        if image_id is not None and first_of_sha.get(p.sha256) == n:
            if p.thumb is not None:
                thumbs.append((image_id, p.thumb, p.thumb_width, p.thumb_height))
            if p.vector is not None:
                vectors.append((image_id, p.vector))
            if ctx.store_bytes and p.data is not None:
                blobs.append((image_id, p.data))
            canon = _near_duplicate_of(ctx.matcher, batch_canonicals, p.phash, image_id, first_new)
            if canon is None and p.phash is not None:
                batch_canonicals.append((image_id, p.phash))
            elif canon is not None:
                canonical.append((image_id, canon))
            outcome = "duplicate" if canon is not None else "new"
            outcomes[n] = FileOutcome(p.key, outcome, image_id=image_id, canonical_id=canon, category=p.category)
            if category_id is not None:
                result.touched_categories.add(category_id)
            continue
        # Identical bytes are already catalogued (before or earlier in this batch): link, do not store again.
        if image_id is None:
            old = existing[p.sha256]
            image_id = old.id
            if ctx.store_bytes and not old.has_blob and p.data is not None:
                blobs.append((image_id, p.data))
                old = replace(old, has_blob=True)
            if not old.has_embedding and p.vector is not None:
                vectors.append((image_id, p.vector))
                old = replace(old, has_embedding=True)
                if old.category_id is not None:
                    result.touched_categories.add(old.category_id)
            if old.category_id is None and category_id is not None:
                adopt_category.append((image_id, category_id))
                result.touched_categories.add(category_id)
                old = replace(old, category_id=category_id)
            existing[p.sha256] = old
        source = known.get(p.key) if p.path is not None else None
        if source is not None and source.image_id == image_id:
            # The same path re-indexed with the same bytes (only its mtime changed): a no-op.
            outcomes[n] = FileOutcome(p.key, "skipped", "unchanged", image_id=image_id, category=p.category)
        else:
            outcomes[n] = FileOutcome(p.key, "linked", image_id=image_id, category=p.category)

    repo.copy_thumbnails(thumbs)
    repo.copy_embeddings(ctx.model_id, vectors)
    repo.copy_blobs(blobs)
    repo.set_canonical(canonical)
    repo.set_category_where_missing(adopt_category)
    sources = [
        (p.key, outcomes[n].image_id, p.byte_size, p.mtime_ns, ctx.job_id)
        for n, p in ok
        if p.path is not None and outcomes[n].image_id is not None
    ]
    repo.upsert_sources(sources)  # type: ignore[arg-type]
    # A path whose bytes changed no longer shows its old image; drop that image if nothing else holds it.
    repo.delete_orphans(
        known[p.key].image_id for n, p in ok if p.key in known and known[p.key].image_id != outcomes[n].image_id
    )
    for n, p in enumerate(batch):
        o = outcomes[n]
        o.sha256 = p.sha256.hex() if p.sha256 else None
        counts[o.outcome] += 1
        result.outcomes.append(o)
    if ctx.job_id is not None:
        jobs = JobRepository(session)
        jobs.record_files(
            ctx.job_id,
            [
                (o.key, o.outcome, o.reason, o.image_id, p.sha256, p.byte_size or None)
                for o, p in zip(result.outcomes, batch, strict=True)
                if o.outcome != "skipped"
            ],
        )
        jobs.add_counts(ctx.job_id, counts)
    result.new_canonicals = batch_canonicals
    return result


def _near_duplicate_of(
    matcher: PhashMatcher, batch_canonicals: list[tuple[int, int]], value: int | None, image_id: int, first_new: int
) -> int | None:
    if value is None:
        return None
    best = matcher.match(value, first_new)
    for other_id, other in batch_canonicals:
        if other_id < image_id and hamming(other, value) <= matcher.threshold and (best is None or other_id < best):
            best = other_id
    return best


def _category_ids(session: Session, names: set[str | None]) -> dict[str, int]:
    repo = CategoryRepository(session)
    return {n.strip().lower(): repo.get_or_create(n).id for n in sorted(n for n in names if n and n.strip())}


def _image_row(p: Processed, categories: dict[str, int]) -> dict[str, Any]:
    return {
        "sha256": p.sha256,
        "phash": None if p.phash is None else to_signed(p.phash),
        "width": p.width,
        "height": p.height,
        "format": p.format,
        "byte_size": p.byte_size,
        "original_name": os.path.basename(p.key) or p.key,
        "source_path": p.key if p.path else None,
        "category_id": categories.get(p.category.strip().lower()) if p.category else None,
    }


def embed_processed(embedder: Embedder, batch: Sequence[Processed], pad_to: int | None = None) -> None:
    """Fill .vector for every decoded item (in place) with one forward pass; frees the input tensors.

    pad_to: pad the batch with zeros to this size so every forward pass has the same shape, which keeps
    each image's vector independent of which other images share its batch."""
    todo = [p for p in batch if p.ok and p.tensor is not None]
    if not todo:
        return
    stacked = np.stack([p.tensor for p in todo])  # type: ignore[misc]
    if pad_to and len(todo) < pad_to:
        stacked = np.concatenate([stacked, np.zeros((pad_to - len(todo), *stacked.shape[1:]), np.float32)])
    vectors = embedder.encode_images(stacked)  # arrays: an ONNX-only process never imports torch
    for p, v in zip(todo, vectors[: len(todo)], strict=True):
        p.vector, p.tensor = v, None


def ingest_bytes(
    session: Session,
    embedder: Embedder,
    files: Sequence[tuple[str, bytes]],
    *,
    settings: Settings,
    category: str | None = None,
    gate: DecodeGate | None = None,
) -> list[FileOutcome]:
    """Files whose bytes are in memory: decode, embed and store each one (bytes always kept in image_blobs),
    then bring search up to date. Does not commit.

    Bad files come back with outcome 'failed' and a reason; the good ones in the same call are stored.
    Identical bytes already in the catalog come back as 'linked' with the existing image id.
    gate: the server's DecodeGate, so uploads and search queries share one bound on concurrent decodes."""
    model = ensure_model(session, embedder, settings)
    result = store_bytes(session, embedder, model.id, files, settings=settings, category=category, gate=gate)
    sync_search(session, settings, model_id=model.id, category_ids=result.touched_categories, embedders=only(embedder))
    return result.outcomes


def store_bytes(
    session: Session,
    embedder: Embedder,
    model_id: int,
    files: Sequence[tuple[str, bytes]],
    *,
    settings: Settings,
    category: str | None = None,
    gate: DecodeGate | None = None,
) -> BatchResult:
    """ingest_bytes without the search sync, for a caller that stores several chunks and syncs once."""
    batch = decode_bytes(embedder, files, settings=settings, category=category, gate=gate)
    existing = IngestRepository(session).existing_by_sha([p.sha256 for p in batch if p.ok and p.sha256], model_id)
    embed_decoded(
        embedder, [p for p in batch if not (p.sha256 in existing and existing[p.sha256].has_embedding)], settings
    )
    return write_decoded(session, model_id, batch, settings, existing)


def prepare_bytes(
    embedder: Embedder,
    files: Sequence[tuple[str, bytes]],
    *,
    settings: Settings,
    category: str | None = None,
    gate: DecodeGate | None = None,
) -> list[Processed]:
    """Decode, hash, thumbnail and embed, touching no database: an upload does this before it takes the
    catalog write lock, so uploads decode and run the model side by side. Every decoded file is embedded,
    even bytes the catalog may already hold with a vector (write_decoded then leaves that vector unused)."""
    with stage("decode"):
        batch = decode_bytes(embedder, files, settings=settings, category=category, gate=gate)
    with stage("embed"):
        embed_decoded(embedder, batch, settings)
    return batch


def write_decoded(
    session: Session,
    model_id: int,
    batch: Sequence[Processed],
    settings: Settings,
    existing: dict[bytes, ExistingImage] | None = None,
) -> BatchResult:
    """The database half of store_bytes: images, bytes, thumbnails, vectors, near-duplicate links."""
    # Near-duplicates are looked up in committed rows: two uploads of near-identical pictures at once must take
    # turns, or neither would see the other (catalog.locks: the hash bands they share).
    WriteLocks(session).phash_bands(
        [p.phash for p in batch if p.ok and p.phash is not None], settings.duplicate_threshold
    )
    ctx = WriteContext(
        model_id=model_id, store_bytes=True, matcher=SqlPhashMatcher(session, settings.duplicate_threshold)
    )
    return write_batch(session, ctx, batch, existing)


def embed_decoded(embedder: Embedder, batch: Sequence[Processed], settings: Settings) -> None:
    to_embed = [p for p in batch if p.ok]
    for start in range(0, len(to_embed), settings.batch_size):
        embed_processed(embedder, to_embed[start : start + settings.batch_size])


def decode_bytes(
    embedder: Embedder,
    files: Sequence[tuple[str, bytes]],
    *,
    settings: Settings,
    category: str | None = None,
    gate: DecodeGate | None = None,
) -> list[Processed]:
    options = DecodeOptions(
        preprocess=embedder.preprocess,
        max_pixels=settings.max_pixels,
        thumbnail_size=settings.thumbnail_size,
        keep_bytes=True,
    )
    batch: list[Processed] = []
    for name, data in files:
        if len(data) > settings.max_upload_bytes:
            batch.append(
                Processed(
                    key=name,
                    category=category,
                    path=None,
                    ok=False,
                    reason=f"file is {len(data)} bytes, over the upload limit of "
                    f"{settings.max_upload_bytes} (IMSRC_MAX_UPLOAD_BYTES)",
                )
            )
            continue
        with contextlib.ExitStack() as slot:
            if gate is not None:
                with stage("decode_wait"):  # part of decode: waiting for a slot of the DecodeGate
                    slot.enter_context(gate.slot())
            batch.append(process(WorkItem(key=name, data=data, category=category), options))
    return batch
