"""API-key protection: with IMSRC_API_KEY set, every write under /api needs the key, and reads too when
IMSRC_PROTECT_READS is on. A plain ASGI middleware so no route can forget it."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from imsrc.api.errors import error_response

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Reads that only run a search are POSTs with a body but change nothing; they count as reads.
READ_ONLY_POSTS = ("/api/search/",)
PUBLIC_PATHS = frozenset({"/health", "/health/ready"})  # probes by orchestrators, which hold no key


# The web page sets this cookie from the key the user typed, so its <img> tags (which cannot send headers) load
# thumbnails and originals when reads are protected. Never accepted for writes: cookies ride along with
# cross-site form posts.
KEY_COOKIE = "imsrc_api_key"


def presented_key(headers: dict[str, str], *, allow_cookie: bool = False) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = headers.get("x-api-key")
    if key is None and allow_cookie:
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except CookieError:
            return None
        morsel = cookies.get(KEY_COOKIE)
        key = unquote(morsel.value) if morsel is not None else None
    # Surrounding whitespace is never part of a key (a pasted key often carries some): strip it as for Bearer.
    return key.strip() if key is not None else None


def holds_key(headers: Mapping[str, str], api_key: str | None) -> bool:
    """Whether a request presented the API key (header, or the page's cookie). True when no key is set:
    then every reader is trusted alike. For what a key-less reader may read but not see in full (paths)."""
    if not api_key:
        return True
    key = presented_key({k.lower(): v for k, v in headers.items()}, allow_cookie=True)
    return key is not None and hmac.compare_digest(key.encode(), api_key.encode())


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, protect_reads: bool) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.protect_reads = protect_reads

    def _needs_key(self, method: str, path: str) -> bool:
        if path in PUBLIC_PATHS:
            return False
        is_api = path.startswith("/api/") or path in ("/openapi.json", "/docs", "/redoc", "/metrics")
        is_write = method in WRITE_METHODS and not (method == "POST" and path.startswith(READ_ONLY_POSTS))
        if is_write:
            return True
        return self.protect_reads and is_api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = presented_key(headers, allow_cookie=scope["method"] in ("GET", "HEAD"))
        if key is None:
            response = error_response(
                401, "unauthorized", "this imsrc requires an API key: send 'Authorization: Bearer KEY' or 'X-API-Key'"
            )
        elif not hmac.compare_digest(key.encode(), self.api_key):
            response = error_response(403, "forbidden", "the API key is not valid")
        else:
            await self.app(scope, receive, send)
            return
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
