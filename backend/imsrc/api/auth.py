"""API key checks. With IMSRC_API_KEY set, writes need the key; with IMSRC_PROTECT_READS also reads."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from imsrc.api.deps import SettingsDep
from imsrc.errors import UnauthorizedError

KEY_COOKIE = "imsrc_api_key"


def _presented_key(request: Request, *, allow_cookie: bool) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = request.headers.get("x-api-key")
    # The cookie lets the web page's <img> tags (which cannot send headers) load images when reads are
    # protected. Never for writes: a cookie rides along with cross-site form posts.
    if key is None and allow_cookie:
        key = request.cookies.get(KEY_COOKIE)
    return key


def _check(request: Request, expected: str | None, *, allow_cookie: bool) -> None:
    if not expected:
        return
    presented = _presented_key(request, allow_cookie=allow_cookie)
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise UnauthorizedError("this action needs the API key (Authorization: Bearer KEY or X-API-Key: KEY)")


def require_write(request: Request, settings: SettingsDep) -> None:
    _check(request, settings.api_key, allow_cookie=False)


def require_read(request: Request, settings: SettingsDep) -> None:
    if settings.protect_reads:
        _check(request, settings.api_key, allow_cookie=True)


WriteAccess = Annotated[None, Depends(require_write)]
ReadAccess = Annotated[None, Depends(require_read)]
