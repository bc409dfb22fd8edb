"""create_app(): the FastAPI application. Heavy objects are made once in the lifespan."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from imsrc import __version__
from imsrc.api import categories, images, metrics, search, system, uploads
from imsrc.api.admission import SearchAdmission
from imsrc.api.docs import install_docs
from imsrc.api.edge import HeadAsGetMiddleware, HostOriginMiddleware, SecurityHeadersMiddleware
from imsrc.api.errors import ERROR_RESPONSES, install_error_handlers
from imsrc.api.limits import BodyLimitMiddleware
from imsrc.api.observability import RequestMiddleware
from imsrc.api.security import ApiKeyMiddleware
from imsrc.config import Settings, get_settings
from imsrc.db.session import Database, open_database
from imsrc.imaging import DecodeGate
from imsrc.resources import frontend_dir
from imsrc.search import warmup
from imsrc.search.refresher import DerivedRefresher
from imsrc.search.service import SearchRuntime

log = logging.getLogger(__name__)


def build_routes(app: FastAPI) -> int:
    """Have FastAPI build every included router's routes now. Since 0.16x it builds them (dependants, a pydantic
    TypeAdapter per parameter) when the first request reaches a router, and a request walks every router in
    front of the one it matches: the first `GET /api/search/similar/{id}` after a start paid for all of them
    (0.1-0.4 s here, most of a cold first query). Best effort: without those methods it does nothing.
    Returns how many routers were built."""
    built = 0
    pending = list(app.router.routes)
    while pending:
        route = pending.pop()
        candidates = getattr(route, "effective_candidates", None)
        if not callable(candidates):
            continue
        pending.extend(candidates())
        low_priority = getattr(route, "effective_low_priority_routes", None)
        if callable(low_priority):
            low_priority()
        built += 1
    return built


def _build_routes_in_background(app: FastAPI) -> None:
    def run() -> None:
        try:
            log.debug("built %d routers before the first request", build_routes(app))
        except Exception as exc:  # best effort: the first request builds them as before
            log.warning("building the routes at start failed: %s: %s", type(exc).__name__, exc)

    threading.Thread(target=run, name="imsrc-build-routes", daemon=True).start()


ROUTERS = (system.router, uploads.router, images.router, categories.router, search.router, metrics.router)


def create_app(
    settings: Settings | None = None, database: Database | None = None, *, database_url: str | None = None
) -> FastAPI:
    """`database`: one to use (not disposed here); else one is opened at startup, on `database_url` if given
    (a worker of `imsrc serve --workers N`: the parent resolved it, so workers never start the embedded server)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = database is None
        app.state.database = database or open_database(settings, url=database_url)
        if settings.search_warmup:  # off in the tests: an app per test would build every route in a thread
            _build_routes_in_background(app)  # not before /health answers: in a thread
        # In the background: /health answers at once; the first searches find things warm when it is done.
        app.state.search_warmup = (
            warmup.start(app.state.database, app.state.search_runtime) if settings.search_warmup else None
        )
        try:
            yield
        finally:
            if app.state.derived_refresher is not None:
                app.state.derived_refresher.close()  # pending refreshes first, while the database is open
            if owned:
                app.state.database.dispose()

    app = FastAPI(
        title="imsrc",
        version=__version__,
        description="Self-hosted image similarity search on PostgreSQL + pgvector.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,  # served by install_docs from pinned local files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    # One bound on concurrent image decodes for uploads and search queries together.
    app.state.decode_gate = DecodeGate.from_settings(settings)
    app.state.search_admission = SearchAdmission(settings.search_concurrency, settings.search_wait_s)
    app.state.derived_refresher = (
        DerivedRefresher(lambda: app.state.database, settings, delay_s=settings.upload_refresh_delay_s)
        if settings.upload_refresh_delay_s > 0
        else None
    )
    # embedders and FAISS load on first use
    app.state.search_runtime = SearchRuntime.create(settings, decode_gate=app.state.decode_gate)
    if database is not None:
        app.state.database = database
    app.add_middleware(HeadAsGetMiddleware)  # innermost: routes see GET, everything outside sees HEAD
    app.add_middleware(BodyLimitMiddleware)  # CORS and the key check wrap its 413
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, protect_reads=settings.protect_reads)
    # Outside the key check and CORS: a foreign Host or Origin is refused before anything else looks at it.
    app.add_middleware(
        HostOriginMiddleware,
        allowed_hosts=settings.allowed_hosts,
        cors_origins=settings.cors_origins,
        bound_host=settings.host,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)
    frontend = frontend_dir()
    if frontend is not None:
        app.mount("/", StaticFiles(directory=frontend, html=True), name="frontend")
    else:
        log.warning("this installation has no web page (frontend/); serving the API only")
    # Request ids, the access log and request metrics wrap the whole stack, Starlette's ServerErrorMiddleware
    # included (add_middleware would put them inside it), so the last-resort 500 and its log line carry the
    # request id too. They get the routes themselves (FastAPI's router holds included routers as opaque branches)
    # to name the route of a request refused before routing.
    routes = [route for router in ROUTERS for route in router.routes] + list(app.router.routes)
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestMiddleware(build_stack(), routes=routes)  # type: ignore[method-assign]
    return app
