"""Uploads: files a client sent (already streamed to disk by the API) into the catalog in one unit of work.

This owns what an upload decides once: the model, chunks of bounded size, decoding and embedding before the
writes, the search sync with its narrow locks (catalog.locks), and running the whole unit again when PostgreSQL
rolled it back on a conflict. The route only parses the request, calls ingest_uploads and counts the results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from imsrc.catalog.captions import CaptionRepository
from imsrc.catalog.repository import CategoryRepository
from imsrc.catalog.schemas import CategoryRef, UploadResult, image_thumbnail_url
from imsrc.config import Settings
from imsrc.db.errors import DATABASE_ERRORS, classify
from imsrc.db.session import Database
from imsrc.imaging import DecodeGate
from imsrc.ingest.service import FileOutcome, ensure_model, prepare_bytes, write_decoded
from imsrc.search.refresher import DerivedRefresher
from imsrc.search.sync import only, sync_search
from imsrc.services.models import choose_and_load
from imsrc.timings import stage

log = logging.getLogger(__name__)

RETRIES = 3
# Most bytes read into memory at once (files are on disk until then).
CHUNK_BYTES = 256 * 1024 * 1024


class StagedFile(Protocol):
    """An uploaded file waiting on disk (api.multipart.UploadedFile is one)."""

    @property
    def filename(self) -> str | None: ...
    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...


def ingest_uploads(
    db: Database,
    settings: Settings,
    files: Sequence[StagedFile],
    category: str | None,
    gate: DecodeGate | None = None,
    caption: str | None = None,
    refresher: DerivedRefresher | None = None,
) -> list[UploadResult]:
    """All files in one unit of work: a crash (not a bad file) leaves nothing behind; bad files are reported
    per file. A deadlock or serialization failure rolls the whole unit back, so it simply runs again.
    gate: the server's DecodeGate, shared with search queries (one bound on concurrent decodes).
    caption: for every stored image that has none yet (already checked by catalog.captions.clean_caption).
    refresher: the server's; the calibration and earlier images' predicted labels are left to it (see
    search.refresher) instead of being redone inside this unit of work."""
    for attempt in range(1, RETRIES + 1):
        try:
            return _ingest_once(db, settings, files, category, gate, caption, refresher)
        except DATABASE_ERRORS as exc:
            if attempt == RETRIES or classify(exc).kind != "conflict":
                raise
            log.warning("upload hit a transaction conflict (%s); retrying (%d/%d)", exc, attempt, RETRIES)
    raise AssertionError("unreachable")


def _ingest_once(
    db: Database,
    settings: Settings,
    files: Sequence[StagedFile],
    category: str | None,
    gate: DecodeGate | None,
    caption: str | None,
    refresher: DerivedRefresher | None,
) -> list[UploadResult]:
    outcomes: list[FileOutcome] = []
    touched: set[int] = set()
    with db.session() as session:
        with stage("connect"):  # a connection from the pool (may wait for one)
            session.connection()
        with stage("model"):
            loaded = choose_and_load(session, settings)
        if loaded.choice.warning:
            log.warning("%s", loaded.choice.warning)
        model_id: int | None = None
        for chunk in _chunks(files, settings.batch_size, CHUNK_BYTES):
            payload = [(f.filename or "upload", f.path.read_bytes()) for f in chunk]
            # Decoding and the model (nearly all of an upload's time) run before any write. The writes take no
            # catalog-wide lock: only near-duplicates of each other, and the search sync's narrow locks per
            # category (catalog.locks), make uploads wait for each other.
            prepared = prepare_bytes(loaded.embedder, payload, settings=settings, category=category, gate=gate)
            with stage("write"):
                if model_id is None:
                    model_id = ensure_model(session, loaded.embedder, settings).id
                result = write_decoded(session, model_id, prepared, settings)
            outcomes.extend(result.outcomes)
            touched |= result.touched_categories
        assert model_id is not None  # the route refuses an upload without files
        if caption is not None:
            CaptionRepository(session).set_where_missing(
                [o.image_id for o in outcomes if o.image_id is not None], caption
            )
        with stage("sync"):
            report = sync_search(
                session,
                settings,
                model_id=model_id,
                category_ids=touched,
                embedders=only(loaded.embedder),
                defer_derived=refresher is not None,
            )
        # The answer names the category each image is in once the upload is done: for bytes the catalog already
        # held, the one they had (whatever this upload asked for); without one, the automatic group it joined.
        where = CategoryRepository(session).of_images([o.image_id for o in outcomes if o.image_id is not None])
    if refresher is not None and report.derived_due:  # committed: the refresh sees this upload's rows
        refresher.request(model_id)
    if settings.regions:
        _add_regions(db, loaded.embedder, [o.image_id for o in outcomes if o.image_id is not None])
    return [_result(o, where) for o in outcomes]


def _add_regions(db: Database, embedder: object, image_ids: list[int]) -> None:
    """IMSRC_REGIONS: the new images' window vectors, after the upload committed (its own transactions, so a
    failure here never loses the upload; `imsrc embed --regions` adds whatever is missing later)."""
    from imsrc.ingest.embed_regions import embed_regions

    try:
        embed_regions(db, embedder, image_ids=image_ids)  # type: ignore[arg-type]
    except Exception:  # logged, not raised: the images are stored and searchable as wholes already
        log.exception("region vectors for uploaded images %s failed; run `imsrc embed --regions`", image_ids)


def _chunks(files: Sequence[StagedFile], count: int, max_bytes: int) -> Iterator[list[StagedFile]]:
    chunk: list[StagedFile] = []
    size = 0
    for f in files:
        if chunk and (len(chunk) >= count or size + f.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(f)
        size += f.size
    if chunk:
        yield chunk


def _result(o: FileOutcome, where: dict[int, tuple[int, str]]) -> UploadResult:
    found = where.get(o.image_id) if o.image_id is not None else None
    category = CategoryRef(id=found[0], name=found[1]) if found is not None else None
    thumb = image_thumbnail_url(o.image_id) if o.image_id is not None else None
    if o.outcome == "new":
        return UploadResult(filename=o.key, status="new", id=o.image_id, category=category, thumbnail_url=thumb)
    if o.outcome == "duplicate":  # stored, and recorded as a near-duplicate of an earlier image
        return UploadResult(
            filename=o.key,
            status="duplicate",
            id=o.image_id,
            duplicate_of=o.canonical_id,
            exact=False,
            category=category,
            thumbnail_url=thumb,
        )
    if o.outcome in ("linked", "skipped"):  # identical bytes were already catalogued: nothing new stored
        return UploadResult(
            filename=o.key,
            status="duplicate",
            id=o.image_id,
            duplicate_of=o.image_id,
            exact=True,
            category=category,
            thumbnail_url=thumb,
        )
    return UploadResult(filename=o.key, status="failed", reason=o.reason or "could not be read as an image")
