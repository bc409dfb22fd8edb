"""Request ids on every response and log line; IMSRC_LOG_FORMAT=json gives one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.logs import log_handler
from tests.browser_support import running_server

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    """What the root logger writes as JSON lines during the test."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    answers = [
        client.get("/health"),
        client.get("/api/nope"),
        client.get("/api/images/not-a-number"),
        client.post("/api/categories", json={}),
    ]
    assert [a.status_code for a in answers] == [200, 404, 422, 422]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(GENERATED.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


def test_a_sane_incoming_id_is_kept_others_are_replaced(client: TestClient) -> None:
    for sane in ("abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "proxy.1:2_x"):
        assert client.get("/health", headers={"X-Request-ID": sane}).headers["x-request-id"] == sane
    for odd in ("has space", "x" * 200, '"><script>', "-leading-dash", ""):
        answered = client.get("/health", headers={"X-Request-ID": odd}).headers["x-request-id"]
        assert GENERATED.fullmatch(answered), (odd, answered)


def test_refusals_by_the_key_check_carry_an_id(settings: Settings, database: Database, session: Session) -> None:
    app = create_app(settings.model_copy(update={"api_key": "s3cret"}), database=database)
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        refused = c.post("/api/categories", json={"name": "x"}, headers={"X-Request-ID": "refused-1"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "refused-1"


def test_an_unhandled_error_is_a_json_500_whose_id_finds_the_traceback(
    settings: Settings, database: Database, captured: io.StringIO
) -> None:
    app = create_app(settings, database=database)

    def boom() -> None:
        logging.getLogger("imsrc.test").warning("about to fail")
        raise RuntimeError("kaboom")

    app.add_api_route("/api/test-boom", boom)
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the page's catch-all mount
    with TestClient(app) as c:
        answer = c.get("/api/test-boom")
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
    request_id = answer.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    mine = [r for r in records(captured) if r.get("request_id") == request_id]
    assert [r["logger"] for r in mine] == ["imsrc.test", "imsrc.api.errors", "imsrc.access"]
    assert "RuntimeError: kaboom" in str(mine[1]["exception"]) and mine[1]["level"] == "error"
    assert mine[2]["status"] == 500 and mine[2]["route"] == "/api/test-boom"
    assert sum("kaboom" in str(r.get("exception", "")) for r in records(captured)) == 1  # logged once


def test_json_formatter_keeps_one_record_on_one_line(captured: io.StringIO) -> None:
    logging.getLogger("imsrc.test").warning('a "quoted"\nmulti-line message')
    try:
        raise ValueError("inner")
    except ValueError:
        logging.getLogger("imsrc.test").exception("with a traceback")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == 'a "quoted"\nmulti-line message' and "request_id" not in first
    assert second["exception"].startswith("Traceback") and "ValueError: inner" in second["exception"]
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None


def test_server_text_lines_carry_the_request_id(client: TestClient) -> None:
    stream = io.StringIO()
    handler = log_handler("text", stream, server=True)
    access = logging.getLogger("imsrc.access")
    access.addHandler(handler)
    old = access.level
    access.setLevel(logging.INFO)
    try:
        client.get("/health", headers={"X-Request-ID": "text-id-7"})
    finally:
        access.removeHandler(handler)
        access.setLevel(old)
    assert re.search(r" INFO imsrc\.access \[text-id-7\] GET /health 200 [0-9.]+ ms$", stream.getvalue().strip())


def test_imsrc_serve_writes_json_lines(database_url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="imsrc-logs-") as tmp:
        data = Path(tmp)
        with running_server(database_url, data, extra_env={"IMSRC_LOG_FORMAT": "json"}) as base:
            ok = httpx.get(f"{base}/health", headers={"X-Request-ID": "serve-json-1"})
            missing = httpx.get(f"{base}/api/images/987654321")
        lines = (data / "server.log").read_text().splitlines()
    assert ok.headers["x-request-id"] == "serve-json-1" and missing.status_code == 404
    parsed = [json.loads(line) for line in lines if line.strip()]  # every line, uvicorn's included, is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in parsed)
    assert any(r["logger"].startswith("uvicorn") for r in parsed)
    health = [r for r in parsed if r.get("request_id") == "serve-json-1"]
    assert len(health) == 1
    assert health[0]["logger"] == "imsrc.access" and health[0]["route"] == "/health"
    assert health[0]["status"] == 200 and isinstance(health[0]["duration_ms"], float)
    not_found = [r for r in parsed if r.get("request_id") == missing.headers["x-request-id"]]
    assert not_found[-1]["route"] == "/api/images/{image_id}" and not_found[-1]["status"] == 404
