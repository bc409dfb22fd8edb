"""/metrics: Prometheus text that the reference parser reads, whose counters move with real uploads and searches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database
from tests.fixtures.database import fresh_database
from tests.helpers import ROOT, make_image

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def own_database(create_database, settings: Settings) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    """A database of this module's own, so the catalog gauges can be checked exactly (uploads commit)."""
    db = fresh_database(create_database, settings, "imsrc_metrics")
    yield db
    db.dispose()


def scrape(client: TestClient, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_after_an_upload_and_a_search(own_database: Database) -> None:
    with TestClient(create_app(own_database.settings, database=own_database)) as client:
        before = scrape(client)
        assert value(before, "imsrc_database_up") == 1
        assert value(before, "imsrc_catalog_images") == 0

        one, two = make_image(1101, size=(96, 80)), make_image(1102, size=(96, 80))
        upload = client.post(
            "/api/images",
            files=[
                ("file", ("one.png", one, "image/png")),
                ("file", ("two.png", two, "image/png")),
                ("file", ("junk.png", b"not an image", "image/png")),
            ],
        )
        assert upload.status_code == 200 and upload.json()["new"] == 2, upload.text
        again = client.post("/api/images", files=[("file", ("one-again.png", one, "image/png"))])
        assert again.json()["duplicates"] == 1
        image_id = upload.json()["results"][0]["id"]
        search = client.post("/api/search/image", files={"file": ("q.png", one, "image/png")})
        assert search.status_code == 200 and search.json()["results"][0]["id"] == image_id
        assert client.get(f"/api/images/{image_id}").status_code == 200
        after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("imsrc_ingest_files_total", outcome="new") == 2
    assert moved("imsrc_ingest_files_total", outcome="duplicate") == 1
    assert moved("imsrc_ingest_files_total", outcome="failed") == 1
    assert moved("imsrc_http_requests_total", method="POST", route="/api/images", status="200") == 2
    assert moved("imsrc_http_request_duration_seconds_count", method="POST", route="/api/search/image") == 1
    # Requests are labelled by route template, never by the raw path (one series per image would explode).
    assert moved("imsrc_http_requests_total", method="GET", route="/api/images/{image_id}", status="200") == 1
    assert not any(f"/{image_id}" in dict(labels).get("route", "") for _, labels in after)
    search_body = search.json()
    for stage in ("embed", "stage1", "stage2", "total"):
        assert (
            moved("imsrc_search_stage_seconds_count", stage=stage, mode="two_stage", backend=search_body["backend"])
            == 1
        ), stage
    # Catalog gauges are read from the database at scrape time.
    assert value(after, "imsrc_catalog_images") == 2
    assert value(after, "imsrc_catalog_vectors", model="open_clip-tiny-test", active="true") == 2
    assert value(after, "imsrc_catalog_categories") >= 0 and value(after, "imsrc_database_size_bytes") > 0


def test_metrics_need_the_key_only_when_reads_are_protected(own_database: Database) -> None:
    keyed = own_database.settings.model_copy(update={"api_key": "s3cret"})
    with TestClient(create_app(keyed, database=own_database)) as client:
        assert client.get("/metrics").status_code == 200  # the key guards writes only
    protected = keyed.model_copy(update={"protect_reads": True})
    with TestClient(create_app(protected, database=own_database)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 403
        assert value(scrape(client, authorization="Bearer s3cret"), "imsrc_database_up") == 1
        # The refusals themselves are counted too: the request middleware is outside the key check.
        after = scrape(client, authorization="Bearer s3cret")
        assert value(after, "imsrc_http_requests_total", method="GET", route="/metrics", status="401") >= 1


MULTIPROCESS_WORKER = """
from imsrc.api.metrics import observe_request, observe_uploads
observe_request("GET", "/api/images", 200, 0.02)
observe_uploads(["new", "new"])
"""
MULTIPROCESS_SCRAPE = """
from prometheus_client import generate_latest
from imsrc.api.metrics import _process_metrics
print(generate_latest(_process_metrics()).decode())
"""


def test_multiprocess_mode_adds_up_the_workers() -> None:
    # Two worker processes record, a third one scrapes: with PROMETHEUS_MULTIPROC_DIR it sees both.
    with tempfile.TemporaryDirectory(prefix="imsrc-prom-") as folder:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": folder,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "backend"), os.environ.get("PYTHONPATH")])),
        }
        for _ in range(2):
            subprocess.run([sys.executable, "-c", MULTIPROCESS_WORKER], env=env, check=True, timeout=120)
        out = subprocess.run(
            [sys.executable, "-c", MULTIPROCESS_SCRAPE],
            env=env,
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        ).stdout
    samples: Samples = {}
    for family in text_string_to_metric_families(out):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    assert value(samples, "imsrc_http_requests_total", method="GET", route="/api/images", status="200") == 2
    assert value(samples, "imsrc_ingest_files_total", outcome="new") == 4
