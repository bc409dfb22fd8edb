"""Per-request bookkeeping, outermost around the app (outside even Starlette's error middleware) so it sees every
answer, the key middleware's 401s and the last-resort 500s included: a request id (X-Request-ID, returned on every
response and put on every log line written while answering), one access log line, and the request metrics by
route template (never the raw path, whose ids would make a series per image)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imsrc.api.errors import error_response
from imsrc.api.metrics import observe_request
from imsrc.logs import REQUEST_ID

access_log = logging.getLogger("imsrc.access")
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is kept when it is a plain token (a UUID, a proxy's hex id): it goes into headers and log lines,
# so nothing that could split a line or a header, and nothing long.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's template (/api/images/{image_id}); the page's files count as one route. A request
    refused before routing (a missing API key) is matched here, so its 401 is counted against its route."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in routes:
            if not hasattr(candidate, "path"):
                continue  # an included router's branch: its routes are in the list themselves
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate  # the path fits, the method does not (a 405)
        route = route or partial
    if route is None:
        return "<unmatched>"
    path = str(getattr(route, "path", ""))
    return f"{path}/{{path}}" if isinstance(route, Mount) else path or "/"


def request_id_from(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_from(scope)
        token = REQUEST_ID.set(request_id)
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                # app: from the request reaching the app to its answer starting, so a client can tell time spent
                # in here from time spent before (the server's accept and parse, its event loop) or on the way.
                app_ms = f"app;dur={(time.perf_counter() - start) * 1000:.1f}".encode()
                message = {
                    **message,
                    "headers": [
                        *headers,
                        (REQUEST_ID_HEADER.encode(), request_id.encode()),
                        (b"server-timing", app_ms),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Outside Starlette's ServerErrorMiddleware, whose handler (api.errors) has logged the traceback, with
            # this request's id, and answered the API's JSON 500 through send_wrapper, so with the id header too.
            # Raising on would only log it a second time, without the id.
            if not started:  # no handler answered: answer in the same shape here
                log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
                response = error_response(500, "internal_error", "the server failed to handle this request")
                await response(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope, self.routes)
            observe_request(scope["method"], route, status, seconds)
            access_log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )
            REQUEST_ID.reset(token)
