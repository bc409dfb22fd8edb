"""POST /api/images: upload one or many files, streamed to temporary files, then ingested (ingest/uploads.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from imsrc.api.deps import DatabaseDep, SettingsDep
from imsrc.api.metrics import observe_uploads
from imsrc.api.multipart import read_multipart
from imsrc.catalog.captions import MAX_CAPTION_CHARS, clean_caption
from imsrc.catalog.schemas import UploadResponse
from imsrc.errors import InvalidImageError, InvalidInputError
from imsrc.ingest.uploads import ingest_uploads

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
async def upload_images(request: Request, settings: SettingsDep, db: DatabaseDep) -> UploadResponse:
    with tempfile.TemporaryDirectory(prefix="imsrc-upload-") as tmp:
        form = await read_multipart(
            request.headers.get("content-type"),
            request.stream(),
            Path(tmp),
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
        # Decoding, hashing and the model run off the event loop.
        results = await run_in_threadpool(
            ingest_uploads, db, settings, form.files, category, request.app.state.decode_gate, caption
        )
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
