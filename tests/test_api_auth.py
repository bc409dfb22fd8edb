"""The page's read-only key cookie: with IMSRC_PROTECT_READS, <img> tags load through it; writes never accept it."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db.session import Database
from tests.fixtures.api import add_image


def _client(settings: Settings, database: Database, session: Session, **changes: object) -> TestClient:
    app = create_app(settings.model_copy(update=changes), database=database)
    app.dependency_overrides[get_session] = lambda: session
    return TestClient(app)


def test_cookie_never_authorises_a_write(settings: Settings, database: Database, session: Session) -> None:
    with _client(settings, database, session, api_key="s3cret") as c:
        c.cookies.set("imsrc_api_key", "s3cret")
        assert c.post("/api/categories", json={"name": "Keyed"}).status_code == 401
        ok = c.post("/api/categories", json={"name": "Keyed"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201


def test_protected_reads_accept_header_or_cookie(settings: Settings, database: Database, session: Session) -> None:
    image = add_image(session, 201)
    with _client(settings, database, session, api_key="s3cret", protect_reads=True) as c:
        assert c.get("/api/images").status_code == 401
        assert c.get(f"/api/images/{image.id}/thumbnail").status_code == 401
        assert c.get("/api/images", headers={"X-API-Key": "s3cret"}).status_code == 200
        c.cookies.set("imsrc_api_key", "wrong")
        assert c.get(f"/api/images/{image.id}/thumbnail").status_code == 403
        c.cookies.set("imsrc_api_key", "s3cret")
        thumb = c.get(f"/api/images/{image.id}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["cache-control"].startswith("private")
        assert c.get(f"/api/images/{image.id}/file").status_code == 200
