"""API-key protection: with IMSRC_API_KEY set, every write under /api needs the key, and reads too when
IMSRC_PROTECT_READS is on. A plain ASGI middleware so no route can forget it."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from imsrc.api.errors import error_response

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Reads that only run a search are POSTs with a body but change nothing; they count as reads.
READ_ONLY_POSTS = ("/api/search/",)
PUBLIC_PATHS = frozenset({"/health"})


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, protect_reads: bool) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.protect_reads = protect_reads

    def _needs_key(self, method: str, path: str) -> bool:
        if path in PUBLIC_PATHS:
            return False
        is_api = path.startswith("/api/") or path in ("/openapi.json", "/docs", "/redoc")
        is_write = method in WRITE_METHODS and not (method == "POST" and path.startswith(READ_ONLY_POSTS))
        if is_write:
            return True
        return self.protect_reads and is_api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = presented_key(headers)
        if key is None:
            response = error_response(401, "unauthorized",
                                      "this imsrc requires an API key: send 'Authorization: Bearer KEY' or 'X-API-Key'")
        elif not hmac.compare_digest(key.encode(), self.api_key):
            response = error_response(403, "forbidden", "the API key is not valid")
        else:
            await self.app(scope, receive, send)
            return
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
