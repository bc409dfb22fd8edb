"""A cap on request bodies that are not multipart uploads.

FastAPI reads a JSON body (and any body sent to a route that takes one) whole into memory before validating it,
and `/api/search/image` read its JSON `{"url": ...}` the same way: a 400 MB body cost 1.5 GB. Every body this API
accepts, other than the multipart uploads that stream to disk under their own limits, is a few hundred bytes of
JSON, so such a body is read here up to MAX_BODY_BYTES and refused with 413 past it, before any route sees it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imsrc.api.errors import error_response

# Room for the largest legitimate body: a category's 200-character name and 2,000-character description,
# even with many characters written as JSON escapes, or a long URL.
MAX_BODY_BYTES = 16 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:  # ASGI header names are lower case
        if key == name:
            return str(value.decode("latin-1"))
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in BODY_METHODS
            or ((_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower() == "multipart/form-data")
        ):
            await self.app(scope, receive, send)
            return
        refuse = error_response(
            413,
            "payload_too_large",
            f"request bodies other than multipart uploads are limited to {self.max_bytes} bytes",
        )
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await refuse(scope, receive, send)  # said so up front: read nothing
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await refuse(scope, receive, send)
                return
            more = bool(message.get("more_body", False))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body, only a disconnect can come

        await self.app(scope, replay, send)
