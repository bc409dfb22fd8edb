"""Per-request bookkeeping, outermost around the app so it sees every answer (401s and 500s included): request
metrics by route template (never the raw path, whose ids would make a series per image)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imsrc.api.metrics import observe_request


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


class RequestMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            observe_request(scope["method"], route_template(scope, self.routes), status, time.perf_counter() - start)
