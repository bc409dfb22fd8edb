"""/api/images: list, detail, original file, thumbnail, delete. Upload lives in api/uploads.py."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from imsrc.api.deps import SessionDep, SettingsDep
from imsrc.api.security import holds_key
from imsrc.catalog.image_repository import DuplicateFilter
from imsrc.catalog.schemas import DeletedImage, ImageDetail, ImagePage, ImageUpdate
from imsrc.catalog.service import ImageService
from imsrc.config import Settings
from imsrc.services import images as image_writes

router = APIRouter(prefix="/api/images", tags=["images"])

ImageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="image id")]
ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "no such image (error JSON)"}}
THUMBNAIL_MAX_AGE = 86_400


@router.get("", response_model=ImagePage, summary="List images, newest first")
def list_images(
    session: SessionDep,
    category_id: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="only this category (id)")] = None,
    category: Annotated[
        str | None, Query(min_length=1, max_length=200, description="only this category (name, any case)")
    ] = None,
    duplicates: Annotated[DuplicateFilter, Query(description="include, exclude or only near-duplicates")] = "include",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 48,
) -> ImagePage:
    return ImageService(session).list_images(
        category_id=category_id, category=category, duplicates=duplicates, page=page, page_size=page_size
    )


@router.get("/{image_id}", response_model=ImageDetail, responses=ERRORS, summary="One image's metadata")
def get_image(image_id: ImageId, request: Request, session: SessionDep, settings: SettingsDep) -> ImageDetail:
    detail = ImageService(session).detail(image_id)
    if not holds_key(request.headers, settings.api_key):
        # With a key set, reads may be open to everyone; where files live on the server is for key holders.
        detail = detail.model_copy(update={"source_path": None})
    return detail


@router.get(
    "/{image_id}/file",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the original bytes"},
        **ERRORS,
        409: {"description": "the referenced file has changed since it was indexed (error JSON)"},
    },
    summary="The original image (stored bytes, or the referenced file while it still holds the indexed bytes)",
)
def get_image_file(image_id: ImageId, session: SessionDep, settings: SettingsDep) -> Response:
    original = ImageService(session).original(image_id)
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": _cache(settings, 3600),
        "Content-Disposition": f"inline; filename*=utf-8''{quote(original.filename)}",
    }
    if original.opened is not None:
        # The verified file object itself, not its path: nothing can be swapped in between check and read.
        headers["Content-Length"] = str(original.opened.size)
        return StreamingResponse(original.opened.chunks(), media_type=original.media_type, headers=headers)
    assert original.data is not None
    return Response(original.data, media_type=original.media_type, headers=headers)


@router.get(
    "/{image_id}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}}, "description": "a WebP thumbnail"},
        304: {"description": "not modified (If-None-Match)"},
        **ERRORS,
    },
    summary="The image's thumbnail (WebP), cacheable",
)
def get_thumbnail(image_id: ImageId, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    data, mime, sha = ImageService(session).thumbnail(image_id)
    # Ids are never reused and an image's bytes never change, so its hash names its thumbnail's content.
    etag = f'"{sha[:32]}-{len(data)}"'
    headers = {"ETag": etag, "Cache-Control": _cache(settings, THUMBNAIL_MAX_AGE), "X-Content-Type-Options": "nosniff"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=mime, headers=headers)


@router.patch(
    "/{image_id}",
    response_model=ImageDetail,
    responses={**ERRORS, 422: {"description": "caption over 2000 characters or with a NUL byte (error JSON)"}},
    summary="Change an image's caption (searchable by keywords; null or blank removes it)",
)
def update_image(
    image_id: ImageId, body: ImageUpdate, request: Request, session: SessionDep, settings: SettingsDep
) -> ImageDetail:
    detail = ImageService(session).update(image_id, body)
    if not holds_key(request.headers, settings.api_key):
        detail = detail.model_copy(update={"source_path": None})
    return detail


@router.delete(
    "/{image_id}",
    response_model=DeletedImage,
    responses=ERRORS,
    summary="Delete an image with its thumbnail, vectors and stored bytes",
)
def delete_image(image_id: ImageId, session: SessionDep, settings: SettingsDep) -> DeletedImage:
    return image_writes.delete_image(session, settings, image_id)


def _cache(settings: Settings, max_age: int) -> str:
    # Behind a read key, shared caches must not keep copies for people without it.
    private = bool(settings.api_key and settings.protect_reads)
    return f"{'private' if private else 'public'}, max-age={max_age}"
