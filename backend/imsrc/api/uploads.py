"""POST /api/images: upload one or many files, streamed to temporary files, then ingested."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from fastapi import APIRouter, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from imsrc.api.deps import DatabaseDep, SettingsDep
from imsrc.api.errors import is_transaction_conflict
from imsrc.api.metrics import observe_uploads
from imsrc.api.multipart import UploadedFile, read_multipart
from imsrc.catalog.repository import CategoryRepository, lock_catalog_writes
from imsrc.catalog.schemas import CategoryRef, UploadResponse, UploadResult, image_thumbnail_url
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.errors import InvalidImageError, InvalidInputError
from imsrc.ingest.imaging import DecodeGate
from imsrc.ingest.service import FileOutcome, ingest_bytes
from imsrc.services.models import choose_and_load

router = APIRouter(prefix="/api/images", tags=["images"])

MAX_FILES_PER_UPLOAD = 1000
RETRIES = 3
log = logging.getLogger(__name__)
# Most bytes read into memory at once while ingesting (files are on disk until then).
CHUNK_BYTES = 256 * 1024 * 1024

# The body is read by our own streaming parser, so FastAPI cannot infer it: describe it for /openapi.json.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more image files (repeat the field)"},
                        "category": {"type": "string", "description": "put every file in this category "
                                                                      "(created if new)"},
                    },
                },
                "encoding": {"file": {"style": "form", "explode": True}},
            }
        },
    }
}


@router.post(
    "",
    response_model=UploadResponse,
    summary="Upload images (multipart `file`, repeatable; optional `category`)",
    openapi_extra=UPLOAD_BODY,
    responses={413: {"description": "a file is over IMSRC_MAX_UPLOAD_BYTES (error JSON)"},
               415: {"description": "not multipart/form-data (error JSON)"},
               422: {"description": "no file could be stored, each one's reason in the message (error JSON)"}},
)
async def upload_images(request: Request, settings: SettingsDep, db: DatabaseDep) -> UploadResponse:
    with tempfile.TemporaryDirectory(prefix="imsrc-upload-") as tmp:
        form = await read_multipart(request.headers.get("content-type"), request.stream(), Path(tmp),
                                    file_field="file", max_file_bytes=settings.max_upload_bytes,
                                    max_files=MAX_FILES_PER_UPLOAD)
        if not form.files:
            raise InvalidInputError("no files: send them in the multipart field 'file'")
        category = " ".join(form.fields.get("category", "").split()) or None
        if category is not None and len(category) > 200:
            raise InvalidInputError("category: at most 200 characters")
        # Decoding, hashing and the model run off the event loop.
        results = await run_in_threadpool(ingest_uploads, db, settings, form.files, category,
                                          request.app.state.decode_gate)
    observe_uploads(r.status for r in results)
    if all(r.status == "failed" for r in results):
        # Nothing was stored: that is a client error, not a partial success.
        reasons = "; ".join(f"{r.filename}: {r.reason}" for r in results[:5])
        more = f" (and {len(results) - 5} more)" if len(results) > 5 else ""
        raise InvalidImageError(f"no image was stored: {reasons}{more}")
    return UploadResponse(
        results=results,
        new=sum(r.status == "new" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        failed=sum(r.status == "failed" for r in results),
    )


def ingest_uploads(db: Database, settings: Settings, files: list[UploadedFile],
                   category: str | None, gate: DecodeGate | None = None) -> list[UploadResult]:
    """All files in one unit of work: a crash (not a bad file) leaves nothing behind. Bad files are
    reported per file by the pipeline. Bytes are read a chunk at a time, so memory stays bounded."""
    for attempt in range(1, RETRIES + 1):
        try:
            return _ingest_once(db, settings, files, category, gate)
        except (DBAPIError, psycopg.Error) as exc:
            # Deadlocks and serialization failures (SQLSTATE class 40) roll the whole unit back, so the
            # upload can simply run again; anything else is a real failure. (COPY goes through psycopg
            # directly, so its errors arrive unwrapped.)
            if attempt == RETRIES or not is_transaction_conflict(exc):
                raise
            log.warning("upload hit a transaction conflict (%s); retrying (%d/%d)", exc, attempt, RETRIES)
    raise AssertionError("unreachable")


def _ingest_once(db: Database, settings: Settings, files: list[UploadedFile],
                 category: str | None, gate: DecodeGate | None) -> list[UploadResult]:
    outcomes: list[FileOutcome] = []
    with db.session() as session:
        # Taken first, before any row is written, so concurrent uploads queue here instead of deadlocking
        # on prototype rows one of them already changed (sync_search takes the same lock again; it nests).
        lock_catalog_writes(session)
        loaded = choose_and_load(session, settings)
        if loaded.choice.warning:
            log.warning("%s", loaded.choice.warning)
        embedder = loaded.embedder
        for chunk in _chunks(files, settings.batch_size, CHUNK_BYTES):
            payload = [(f.filename or "upload", f.path.read_bytes()) for f in chunk]
            outcomes.extend(ingest_bytes(session, embedder, payload, settings=settings, category=category,
                                         gate=gate))
        ref = None
        if category is not None and any(o.outcome != "failed" for o in outcomes):
            found = CategoryRepository(session).by_name(category)
            ref = CategoryRef(id=found.id, name=found.name) if found is not None else None
    return [_result(o, ref) for o in outcomes]


def _chunks(files: list[UploadedFile], count: int, max_bytes: int) -> Iterator[list[UploadedFile]]:
    chunk: list[UploadedFile] = []
    size = 0
    for f in files:
        if chunk and (len(chunk) >= count or size + f.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(f)
        size += f.size
    if chunk:
        yield chunk


def _result(o: FileOutcome, category: CategoryRef | None) -> UploadResult:
    thumb = image_thumbnail_url(o.image_id) if o.image_id is not None else None
    if o.outcome == "new":
        return UploadResult(filename=o.key, status="new", id=o.image_id, category=category, thumbnail_url=thumb)
    if o.outcome == "duplicate":  # stored, and recorded as a near-duplicate of an earlier image
        return UploadResult(filename=o.key, status="duplicate", id=o.image_id, duplicate_of=o.canonical_id,
                            exact=False, category=category, thumbnail_url=thumb)
    if o.outcome in ("linked", "skipped"):  # identical bytes were already catalogued: nothing new stored
        return UploadResult(filename=o.key, status="duplicate", id=o.image_id, duplicate_of=o.image_id,
                            exact=True, category=category, thumbnail_url=thumb)
    return UploadResult(filename=o.key, status="failed", reason=o.reason or "could not be read as an image")
