"""The HTTP edge: which Host names and Origins may talk to imsrc, and the browser hardening headers.

imsrc usually listens on loopback without a key, so a web page the user visits is its main adversary:
- DNS rebinding: a page on attacker.example re-points that name at 127.0.0.1 and then reads and writes the API
  as "same-origin". The browser still sends `Host: attacker.example`, so only allow-listed Host names pass:
  IP literals (a rebinding page can never make the browser send one), localhost names, this machine's name,
  and IMSRC_ALLOWED_HOSTS (the public names of a server behind a proxy).
- Cross-site writes: a page on another origin (another local port included) can POST a form or a no-cors fetch
  without reading the answer. Browsers send Origin on such requests, so a state-changing request whose Origin
  (or, without one, Referer) is not this server, an allowed public name or an IMSRC_CORS_ORIGINS entry is
  refused. Requests with neither header (curl, scripts, the CLI) are not browsers and pass.
Plain ASGI middlewares, so no route can forget them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imsrc.api.errors import error_response

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def split_host(value: str) -> str | None:
    """The lower-case name or address of a Host header (port and IPv6 brackets removed); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    name = name.rstrip(".")
    return name or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostOriginMiddleware:
    def __init__(
        self, app: ASGIApp, allowed_hosts: list[str], cors_origins: list[str], bound_host: str | None = None
    ) -> None:
        self.app = app
        self.public_names = [h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()]
        # The machine's name and the name it was bound to (`imsrc serve --host myhost.lan`) are its own too.
        self.own_names = {socket.gethostname().lower(), (bound_host or "").strip("[]").lower().rstrip(".")}
        self.cors_origins = {o.strip().rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, name: str) -> bool:
        return (
            _is_ip(name)
            or name in LOCAL_NAMES
            or name.endswith(".localhost")
            or name in self.own_names
            or _matches(name, self.public_names)
        )

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.cors_origins:
            return True
        try:
            parts = urlsplit(origin)
            name = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False  # "null" (sandboxed frames, file: pages, some redirects) included
        if host_header is not None and parts.netloc == host_header.strip().lower():
            return True  # same origin
        # Behind a proxy that rewrites Host, the page's origin is the public name the proxy serves.
        return _matches(name.rstrip("."), self.public_names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host_header = headers.get("host")
        if host_header is not None:
            name = split_host(host_header)
            if name is None or not self.host_allowed(name):
                await error_response(
                    400,
                    "host_not_allowed",
                    f"Host {host_header[:100]!r} is not a name of this server; add it to IMSRC_ALLOWED_HOSTS if it is",
                )(scope, receive, send)
                return
        if scope["method"] in STATE_CHANGING:
            origin = headers.get("origin")
            if origin is None and headers.get("referer"):
                try:
                    ref = urlsplit(headers["referer"])
                    origin = f"{ref.scheme}://{ref.netloc}"
                except ValueError:
                    origin = "null"
            if origin is not None and not self.origin_allowed(origin, host_header):
                await error_response(
                    403,
                    "origin_not_allowed",
                    f"requests from {origin[:100]!r} may not change anything here; add the origin to "
                    "IMSRC_CORS_ORIGINS if it should",
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


# The page loads only its own files; images may also be blob: (previews of files being uploaded) or data:.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# Swagger UI (served from the fastapi-offline package) styles elements inline and draws icons as data: images.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# API answers are data, never documents: nothing in them may run, even if a browser opens one.
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
DOCS_PATHS = ("/docs",)
API_PREFIXES = ("/api/", "/openapi.json", "/health", "/metrics")


def csp_for(path: str) -> str:
    if path in DOCS_PATHS or path.startswith("/docs/"):
        return DOCS_CSP
    if path.startswith(API_PREFIXES):
        return API_CSP
    return PAGE_CSP


class SecurityHeadersMiddleware:
    """Content-Security-Policy, no framing (clickjacking), no MIME sniffing, no Referer to other sites."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = csp_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", csp)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
                # Not no-referrer: with it, browsers send "Origin: null" on the page's own POSTs.
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGetMiddleware:
    """HEAD is answered like GET without the body (RFC 9110 §9.3.2). FastAPI routes declare GET only, so a HEAD
    fell through to the web page's static mount and came back 404 (`curl -I /api/status`); monitors and link
    checkers use HEAD. Innermost, so the key check and the Origin rules still see the real method."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
