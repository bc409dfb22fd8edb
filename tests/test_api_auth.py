"""IMSRC_API_KEY: writes need the key; with IMSRC_PROTECT_READS reads too (the page's cookie works for reads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db.session import Database
from tests.api_helpers import add_image


def _client(settings: Settings, database: Database, session: Session, **changes: object) -> TestClient:
    app = create_app(settings.model_copy(update=changes), database=database)
    app.dependency_overrides[get_session] = lambda: session
    return TestClient(app)


@pytest.fixture()
def keyed(settings: Settings, database: Database, session: Session) -> Iterator[TestClient]:
    with _client(settings, database, session, api_key="s3cret") as c:
        yield c


def test_writes_need_the_key(keyed: TestClient) -> None:
    refused = keyed.post("/api/categories", json={"name": "Keyed"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert keyed.post("/api/categories", json={"name": "Keyed"}, headers={"X-API-Key": "wrong"}).status_code == 401
    # a cookie never authorises a write (cross-site form posts carry cookies)
    keyed.cookies.set("imsrc_api_key", "s3cret")
    assert keyed.post("/api/categories", json={"name": "Keyed"}).status_code == 401
    keyed.cookies.clear()
    ok = keyed.post("/api/categories", json={"name": "Keyed"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 201
    assert keyed.get("/api/categories").status_code == 200  # reads stay open


def test_protected_reads_accept_header_or_cookie(settings: Settings, database: Database, session: Session) -> None:
    image = add_image(session, 201)
    with _client(settings, database, session, api_key="s3cret", protect_reads=True) as c:
        assert c.get("/api/images").status_code == 401
        assert c.get(f"/api/images/{image.id}/thumbnail").status_code == 401
        assert c.get("/api/images", headers={"X-API-Key": "s3cret"}).status_code == 200
        c.cookies.set("imsrc_api_key", "s3cret")
        thumb = c.get(f"/api/images/{image.id}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["cache-control"].startswith("private")
