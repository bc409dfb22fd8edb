"""POST /api/images: upload one or many files, streamed to temporary files, then ingested (ingest/uploads.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from imsrc.api.deps import DatabaseDep, SettingsDep
from imsrc.api.metrics import observe_uploads
from imsrc.api.multipart import read_multipart
from imsrc.catalog.captions import MAX_CAPTION_CHARS, clean_caption
from imsrc.catalog.schemas import UploadResponse, UploadResult
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.errors import InvalidImageError, InvalidInputError
from imsrc.ingest.uploads import ingest_uploads
from imsrc.timings import collect, record, stage

router = APIRouter(prefix="/api/images", tags=["images"])

MAX_FILES_PER_UPLOAD = 1000

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
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more image files (repeat the field)",
                        },
                        "category": {
                            "type": "string",
                            "description": "put every file in this category (created if new)",
                        },
                        "caption": {
                            "type": "string",
                            "maxLength": MAX_CAPTION_CHARS,
                            "description": "a caption for every file that has none yet (searchable "
                            "by keywords; no NUL bytes)",
                        },
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
    responses={
        413: {"description": "a file is over IMSRC_MAX_UPLOAD_BYTES (error JSON)"},
        415: {"description": "not multipart/form-data (error JSON)"},
        422: {"description": "no file could be stored, each one's reason in the message (error JSON)"},
    },
)
async def upload_images(request: Request, response: Response, settings: SettingsDep, db: DatabaseDep) -> UploadResponse:
    with collect() as times, tempfile.TemporaryDirectory(prefix="imsrc-upload-") as tmp:
        results = await _store(request, settings, db, Path(tmp))
        response.headers["Server-Timing"] = times.header()
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


async def _store(request: Request, settings: Settings, db: Database, tmp: Path) -> list[UploadResult]:
    started = time.perf_counter()
    with stage("receive"):
        form = await read_multipart(
            request.headers.get("content-type"),
            request.stream(),
            tmp,
            file_field="file",
            max_file_bytes=settings.max_upload_bytes,
            max_files=MAX_FILES_PER_UPLOAD,
        )
    if not form.files:
        raise InvalidInputError("no files: send them in the multipart field 'file'")
    category = " ".join(form.fields.get("category", "").split()) or None
    if category is not None and len(category) > 200:
        raise InvalidInputError("category: at most 200 characters")
    caption = clean_caption(form.fields.get("caption"))
    submitted = time.perf_counter()

    def ingest() -> list[UploadResult]:
        record("queue", time.perf_counter() - submitted)  # waiting for a threadpool thread
        state = request.app.state
        return ingest_uploads(
            db, settings, form.files, category, state.decode_gate, caption, refresher=state.derived_refresher
        )

    # Decoding, hashing and the model run off the event loop.
    results = await run_in_threadpool(ingest)
    record("route", time.perf_counter() - started)
    return results
