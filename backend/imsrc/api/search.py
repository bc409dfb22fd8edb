"""Search endpoints: by uploaded image or URL, by text, "more like this", and categories-only (stage 1).

Model inference and database work run in the threadpool (run_in_threadpool), never on the event loop.
The SearchRuntime (embedders, prototype matrices, FAISS indexes) lives on app.state and is injected.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from imsrc.api.deps import AdmissionDep, RuntimeDep, SessionDep, SettingsDep, in_unit_of_work
from imsrc.api.metrics import observe_search
from imsrc.api.multipart import read_multipart
from imsrc.config import Settings
from imsrc.errors import InvalidInputError
from imsrc.search.keywords import check_keywords
from imsrc.search.schemas import (
    Backend,
    CategoriesResponse,
    Comparator,
    KeywordMode,
    Match,
    Mode,
    SearchOptions,
    SearchResponse,
    UrlQuery,
)
from imsrc.search.service import SearchRuntime

router = APIRouter(prefix="/api/search", tags=["search"])

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "the query image"}},
                }
            },
            "application/json": {"schema": UrlQuery.model_json_schema()},
        },
    }
}


async def search_options(
    k: Annotated[int | None, Query(ge=1, le=1000, description="results (default IMSRC_SEARCH_K)")] = None,
    categories: Annotated[
        str | None, Query(description="stage-1 fan-out: a number of categories, or 'auto' (score-mass rule)")
    ] = None,
    category: Annotated[
        list[str] | None, Query(description="explicit category filter, repeatable (names or ids); skips stage 1")
    ] = None,
    mode: Annotated[Mode, Query(description="two_stage (default), ann (no stage 1) or exact")] = "two_stage",
    backend: Annotated[Backend | None, Query(description="stage-2 backend (default IMSRC_SEARCH_BACKEND)")] = None,
    model: Annotated[str | None, Query(description="embedding model (default: the active one)")] = None,
    include_duplicates: Annotated[bool, Query(description="also return non-canonical copies")] = False,
    rerank: Annotated[
        Comparator | None,
        Query(
            description="re-score the first rerank_top candidates by orb, sift (RANSAC inliers), ssim, histogram or "
            "pixel (image queries and similar)"
        ),
    ] = None,
    rerank_top: Annotated[int, Query(ge=1, le=200, description="candidates to re-score (1-200)")] = 50,
    match: Annotated[
        Match,
        Query(
            description="whole (default) or partial: also match windows of each image (crops, details); needs region "
            "vectors (imsrc embed --regions), else 409"
        ),
    ] = "whole",
    keywords: Annotated[
        str | None,
        Query(
            max_length=1000,
            description=('words to match in captions (web-search syntax: "a phrase", or, -word; English stemming)'),
        ),
    ] = None,
    keyword_mode: Annotated[
        KeywordMode,
        Query(
            description=(
                "filter: only images whose caption matches, ranked by the query's vector; boost: the vector search's "
                "results and the best matches, ranked by cosine + boost where the caption matches"
            )
        ),
    ] = "filter",
    boost: Annotated[
        float, Query(ge=0, le=1, description="added to a matching image's score (keyword_mode boost)")
    ] = 0.1,
    min_score: Annotated[
        float | None,
        Query(
            ge=-1,
            le=1000,
            description=(
                "drop results scoring below this (cosine; ts_rank_cd for keywords alone); fewer than k may come back"
            ),
        ),
    ] = None,
) -> SearchOptions:
    fan_out: int | Literal["auto"] | None = None
    if categories is not None:
        if categories == "auto":
            fan_out = "auto"
        elif categories.isascii() and categories.isdigit() and len(categories) <= 9 and int(categories) >= 1:
            fan_out = int(categories)
        else:
            raise InvalidInputError("categories must be a positive integer or 'auto'")
    try:
        return SearchOptions(
            k=k,
            categories=fan_out,
            category=category or [],
            mode=mode,
            backend=backend,
            model=model,
            include_duplicates=include_duplicates,
            rerank=rerank,
            rerank_top=rerank_top,
            match=match,
            keywords=_keywords(keywords),
            keyword_mode=keyword_mode,
            boost=boost,
            min_score=min_score,
        )
    except ValidationError as exc:
        raise InvalidInputError(str(exc.errors()[0].get("msg", "invalid search options"))) from exc


OptionsDep = Annotated[SearchOptions, Depends(search_options)]


def _keywords(value: str | None) -> str | None:
    """Blank keywords mean none (an empty box in a form); anything else is checked, NUL bytes refused."""
    if value is None or (not value.strip() and "\x00" not in value):
        return None
    return check_keywords(value)


async def _image_or_url(request: Request, settings: Settings) -> tuple[bytes | None, str | None]:
    """The query image from a multipart `file`, or a URL from a JSON body {"url": ...} (which BodyLimitMiddleware
    has already capped). The file streams to disk like an upload and stops with 413 at the upload limit."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = UrlQuery.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError) as exc:
            raise InvalidInputError('send JSON {"url": "https://..."} or a multipart file') from exc
        return None, body.url
    if ctype.startswith("multipart/form-data"):
        with tempfile.TemporaryDirectory(prefix="imsrc-query-") as tmp:
            form = await read_multipart(
                ctype,
                request.stream(),
                FilePath(tmp),
                file_field="file",
                max_file_bytes=settings.max_upload_bytes,
                max_files=1,
            )
            if not form.files:
                raise InvalidInputError("multipart field 'file' with the query image is missing")
            return form.files[0].path.read_bytes(), None
    raise InvalidInputError('send the image as multipart field "file", or JSON {"url": "https://..."}')


async def _query_image(request: Request, settings: Settings, runtime: SearchRuntime) -> bytes:
    """The query image's bytes. A URL is fetched here, before the search takes its turn (api/admission.py): the
    fetch has its own bound and deadline (IMSRC_URL_FETCH_CONCURRENCY, IMSRC_URL_FETCH_TIMEOUT_S), and a remote
    server that answers slowly must not hold one of the worker's few search turns while it does."""
    data, url = await _image_or_url(request, settings)
    if url is not None:
        return await run_in_threadpool(runtime.url_fetcher.fetch, url)
    assert data is not None
    return data


@router.post(
    "/image",
    response_model=SearchResponse,
    openapi_extra=_BODY_DOC,
    summary="Search by an uploaded image or an image URL",
)
async def search_image(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    admission: AdmissionDep,
    options: OptionsDep,
    q: Annotated[
        str | None,
        Query(max_length=1000, description=("caption keywords, as `keywords` (text plus an image: hybrid search)")),
    ] = None,
) -> SearchResponse:
    if q is not None:
        if options.keywords is not None:
            # two keyword strings would leave one silently unused
            raise InvalidInputError("give the caption keywords once: either q or keywords, not both")
        options = options.model_copy(update={"keywords": _keywords(q)})
    data = await _query_image(request, settings, runtime)
    return observe_search(
        await admission.run(in_unit_of_work(session, runtime.service(session).search_image), data, options)
    )


@router.get("/text", response_model=SearchResponse, summary="Search by text (CLIP-family models)")
async def search_text(
    session: SessionDep,
    runtime: RuntimeDep,
    admission: AdmissionDep,
    options: OptionsDep,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="the text query")],
) -> SearchResponse:
    return observe_search(
        await admission.run(in_unit_of_work(session, runtime.service(session).search_text), q, options)
    )


@router.get("/keywords", response_model=SearchResponse, summary="Search captions by keywords alone (no model)")
async def search_keywords(
    session: SessionDep,
    runtime: RuntimeDep,
    admission: AdmissionDep,
    options: OptionsDep,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=1000,
            description=('words to match in captions (web-search syntax: "a phrase", or, -word)'),
        ),
    ],
) -> SearchResponse:
    # Keywords alone have no query vector or image: say so rather than answer as if these had been applied.
    if options.match == "partial":
        raise InvalidInputError("match=partial needs a query image or text; keywords alone match whole captions")
    if options.rerank is not None:
        raise InvalidInputError("rerank needs a query image; keywords alone are ranked by ts_rank_cd")
    return observe_search(
        await admission.run(
            in_unit_of_work(session, runtime.service(session).search_keywords), check_keywords(q), options
        )
    )


@router.get("/similar/{image_id}", response_model=SearchResponse, summary="More like this indexed image")
async def search_similar(
    session: SessionDep,
    runtime: RuntimeDep,
    admission: AdmissionDep,
    options: OptionsDep,
    image_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
) -> SearchResponse:
    return observe_search(
        await admission.run(in_unit_of_work(session, runtime.service(session).similar), image_id, options)
    )


@router.post(
    "/categories",
    response_model=CategoriesResponse,
    openapi_extra=_BODY_DOC,
    summary="Which categories is this image like? (stage 1 alone, with scores)",
)
async def search_categories(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    admission: AdmissionDep,
    model: Annotated[str | None, Query()] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    samples: Annotated[int, Query(ge=0, le=12, description=("sample images per category (thumbnail URLs)"))] = 0,
) -> CategoriesResponse:
    data = await _query_image(request, settings, runtime)
    service = runtime.service(session)
    return await admission.run(
        in_unit_of_work(session, service.categories_for_image), data, model_name=model, limit=limit, samples=samples
    )
