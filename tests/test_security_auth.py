"""IMSRC_API_KEY: writes need the key; reads too when IMSRC_PROTECT_READS is on."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database


def _client(settings: Settings, database: Database, **overrides: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides), database=database))


def test_no_key_configured_means_open(settings: Settings, database: Database) -> None:
    with _client(settings, database) as client:
        assert client.get("/api/status").status_code == 200


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_writes_need_the_key(settings: Settings, database: Database, method: str) -> None:
    with _client(settings, database, api_key="s3cret") as client:
        missing = client.request(method.upper(), "/api/categories")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        wrong = client.request(method.upper(), "/api/categories", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403
        # With the key the request reaches routing (whatever the route then says, it is not 401/403).
        for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            assert client.request(method.upper(), "/api/categories", headers=headers).status_code not in (401, 403)


def test_reads_open_unless_protected(settings: Settings, database: Database) -> None:
    with _client(settings, database, api_key="k") as client:
        assert client.get("/api/status").status_code == 200
        assert client.get("/health").status_code == 200
    with _client(settings, database, api_key="k", protect_reads=True) as client:
        assert client.get("/api/status").status_code == 401
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/api/status", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/health").status_code == 200  # liveness probes never need a key
