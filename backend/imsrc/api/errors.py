"""The one place where errors become HTTP responses: `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from imsrc.db.errors import DATABASE_ERRORS, classify
from imsrc.embeddings.errors import ModelError
from imsrc.errors import BusyError, ImsrcError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    node: str | None = None  # node_unavailable only: the Citus node (host:port) that did not answer


class ErrorBody(BaseModel):
    """Every error the API returns has this shape."""

    error: ErrorDetail


# Documented on every operation, so clients (and schemathesis) know every error's shape and status.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "bad request"),
        (401, "API key missing"),
        (403, "API key wrong, or a foreign Origin"),
        (404, "not found"),
        (409, "conflict"),
        (413, "too large"),
        (415, "unsupported media type"),
        (422, "invalid input"),
        (500, "internal error"),
        (503, "database or model unavailable; retry"),
    ]
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImsrcError)
    async def _domain(_: Request, exc: ImsrcError) -> JSONResponse:
        response = error_response(exc.status_code, exc.code, exc.message)
        if isinstance(exc, BusyError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ModelError)
    async def _model(_: Request, exc: ModelError) -> JSONResponse:
        # The model layer's errors carry their status and code too, without depending on imsrc.errors.
        if exc.status_code >= 500:
            log.error("model error: %s", exc)
        return error_response(exc.status_code, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_input", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, code, str(exc.detail))

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        failure = classify(exc)
        if failure.kind == "conflict":
            log.warning("transaction conflict: %s", failure.detail)
            return error_response(503, "database_busy", "a concurrent change conflicted with this one; retry")
        if failure.kind == "busy":
            log.warning("connection pool exhausted: %s", failure.detail)
            return error_response(503, "busy", "the server is busy; retry shortly")
        if failure.kind == "invalid_value":  # a NUL byte in text, a number out of range, ...
            return error_response(422, "invalid_input", f"a value was not accepted: {failure.detail}")
        if failure.kind == "node_unavailable":
            # Never a shorter list: the statement needed that node's shards, so the request fails, naming it.
            log.warning("Citus node unavailable: %s", failure.detail)
            message = (
                f"the Citus node {failure.node} holding part of the data this request needs is not "
                "reachable; requests that need only other nodes still work"
            )
            return JSONResponse(
                status_code=503,
                content={"error": {"code": "node_unavailable", "message": message, "node": failure.node}},
            )
        if failure.kind == "unavailable":
            log.warning("database unavailable: %s", failure.detail)
            return error_response(503, "database_unavailable", "the database is not reachable; retry shortly")
        log.error("database error", exc_info=exc)
        return error_response(500, "database_error", "the database rejected the request")

    for kind in DATABASE_ERRORS:
        app.add_exception_handler(kind, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The last resort (Starlette's ServerErrorMiddleware calls it): a bug still answers in the API's shape,
        # not Starlette's plain-text page, and says nothing about the server's insides.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "the server failed to handle this request")
