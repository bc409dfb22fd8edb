"""/health, /api/status, OpenAPI and the error format."""

from __future__ import annotations

import socket

from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.config import Settings
from tests.fixtures.database import database_for


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


def test_head_is_answered_like_get_without_a_body(client: TestClient) -> None:
    """`curl -I /api/status` was 404: FastAPI routes declare GET only and HEAD fell through to the page's mount."""
    for path in ("/api/status", "/health", "/api/categories", "/"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert client.head("/api/nope").status_code == 404
    assert client.post("/api/status").status_code == 405  # other methods still follow the routes


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/api/status" in spec["paths"] and "/health" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_json_error(client: TestClient) -> None:
    response = client.get("/api/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_status_reports_search_model_and_text_support(client: TestClient, session: Session) -> None:
    # Nothing active in the catalog yet: the configured model (the tiny CLIP in tests) reads text.
    body = client.get("/api/status").json()
    assert body["search_model"] == {
        "name": "open_clip-tiny-test",
        "supports_text": True,
        "source": "settings",
        "inference": "torch",
    }  # tests run IMSRC_INFERENCE=torch (conftest)
    assert body["text_search"] is True and body["max_upload_bytes"] == 50 * 1024 * 1024
    # An image-only model active in the catalog wins over the setting.
    session.execute(text("UPDATE embedding_models SET is_active = false"))
    session.execute(
        text(
            "INSERT INTO embedding_models (name, dimension, family, supports_text, is_active) "
            "VALUES ('image-only-test', 4, 'test', false, true)"
        )
    )
    body = client.get("/api/status").json()
    assert body["search_model"]["name"] == "image-only-test" and body["search_model"]["source"] == "catalog"
    assert body["text_search"] is False and body["active_model"] == "image-only-test"


def test_status_lists_recent_jobs(client: TestClient, session: Session) -> None:
    session.execute(
        text(
            "INSERT INTO ingest_jobs (kind, job_key, status, files_total, new_count, failed_count) "
            "VALUES ('index', 'status-test', 'completed', 3, 2, 1)"
        )
    )
    jobs = client.get("/api/status").json()["jobs"]
    assert jobs[0]["kind"] == "index" and jobs[0]["status"] == "completed"
    assert (jobs[0]["files_total"], jobs[0]["new"], jobs[0]["failed"]) == (3, 2, 1)


def test_openapi_describes_images_and_categories(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, methods in {
        "/api/images": {"get", "post"},
        "/api/images/{image_id}": {"get", "delete"},
        "/api/images/{image_id}/file": {"get"},
        "/api/images/{image_id}/thumbnail": {"get"},
        "/api/categories": {"get", "post"},
        "/api/categories/{category_id}": {"get", "patch"},
    }.items():
        assert methods <= set(paths[path]), path
    upload = paths["/api/images"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["items"]["format"] == "binary" and upload["required"] == ["file"]
    listing = {p["name"]: p for p in paths["/api/images"]["get"]["parameters"]}
    assert listing["page_size"]["schema"]["maximum"] == 200
    assert set(listing["duplicates"]["schema"]["enum"]) == {"include", "exclude", "only"}
    assert "ImageDetail" in spec["components"]["schemas"] and "CategoryDetail" in spec["components"]["schemas"]
    assert paths["/api/images/{image_id}/thumbnail"]["get"]["responses"]["200"]["content"] == {"image/webp": {}}


def test_status_describes_the_active_models_index(client: TestClient, session: Session) -> None:
    session.execute(text("UPDATE embedding_models SET is_active = false"))
    models = ModelRepository(session)
    model = models.register(name="index-status-test", dimension=3, family="test", params={}, supports_text=False)
    models.set_active(model)
    index = client.get("/api/status").json()["index"]
    assert index == {
        "backend": "pgvector",
        "model": "index-status-test",
        "vectors": 0,
        "hnsw": True,
        "category_indexes": 0,
        "state": "empty",
    }


def test_readiness_when_the_database_answers(client: TestClient) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["database"], body["migrations"]) == ("ready", "ok", "current")
    assert body["schema_revision"] == body["schema_head"] is not None
    assert 0 < body["round_trip_ms"] < 5000


def test_status_reports_the_database_round_trip(client: TestClient) -> None:
    database = client.get("/api/status").json()["database"]
    assert database["reachable"] is True and 0 < database["round_trip_ms"] < 5000


def _app_on(settings: Settings, url: str, **changes: object) -> TestClient:
    own = settings.model_copy(update={"database_url": url, **changes})
    return TestClient(create_app(own, database=database_for(own, migrate=False)))


def test_liveness_stays_up_and_readiness_fails_while_the_database_is_down(settings: Settings) -> None:
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _app_on(settings, f"postgresql://imsrc@127.0.0.1:{port}/imsrc", api_key="k", protect_reads=True) as c:
        assert c.get("/health").status_code == 200
        ready = c.get("/health/ready")  # no key: probes hold none
        assert ready.status_code == 503
        assert ready.json() | {"version": None, "schema_head": None} == {
            "status": "unavailable",
            "version": None,
            "database": "unreachable",
            "migrations": "unknown",
            "schema_revision": None,
            "schema_head": None,
            "round_trip_ms": None,
            "search_warm": None,  # the tests' settings turn the warm-up off
        }
        assert str(port) not in ready.text  # where the database lives is for the log, not the public answer
        status = c.get("/api/status", headers={"X-API-Key": "k"})
        assert status.status_code == 503 and status.json()["error"]["code"] == "database_unavailable"


def test_readiness_fails_on_a_schema_that_is_not_migrated(settings: Settings, create_database) -> None:  # type: ignore[no-untyped-def]
    with _app_on(settings, create_database("imsrc_unmigrated")) as c:
        ready = c.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert (body["database"], body["migrations"], body["schema_revision"]) == ("ok", "out_of_date", None)
    assert body["round_trip_ms"] > 0


def test_the_routers_are_built_at_start_not_by_the_first_request(settings: Settings, database) -> None:  # type: ignore[no-untyped-def]
    """FastAPI builds an included router's routes (dependants, parameter adapters) when the first request
    reaches it, and a request walks every router in front of its own: the first search after a start paid
    0.1-0.4 s for that. With the warm-up on, the app builds them in a background thread at start (after /health
    can answer)."""
    import threading

    # IMSRC_SEARCH_WARMUP on (the default; the test settings turn it off): the catalog is empty, so the search
    # warm-up itself finds no model and stops.
    app = create_app(settings.model_copy(update={"search_warmup": True}), database=database)
    included = [r for r in app.router.routes if callable(getattr(r, "effective_candidates", None))]
    assert included, "this FastAPI has no lazily built routers: nothing to build"
    with TestClient(app):
        for thread in threading.enumerate():
            if thread.name == "imsrc-build-routes":
                thread.join(60)
        # Built (and not by a request: none was made).
        assert all(r._effective_candidates_version is not None for r in included)
