"""/health, /api/status, OpenAPI and the error format."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.db.session import Database


@pytest.fixture()
def client(settings: Settings, database: Database, session: Session) -> Iterator[TestClient]:
    app = create_app(settings, database=database)
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        yield c


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_status_reports_revision_and_counts(client: TestClient, session: Session) -> None:
    CategoryRepository(session).get_or_create("status-cat")
    body = client.get("/api/status").json()
    assert body["schema_revision"] == body["schema_head"] == "0001_catalog" or body["schema_revision"]
    assert body["schema_revision"] == body["schema_head"]
    assert body["database"]["reachable"] is True
    assert body["counts"]["categories"] >= 1


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/api/status" in spec["paths"] and "/health" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_json_error(client: TestClient) -> None:
    response = client.get("/api/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
