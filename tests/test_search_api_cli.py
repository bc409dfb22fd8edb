"""API and CLI search round trips on real images, indexed through the ingest code with the tiny CLIP."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.ingest.service import ingest_bytes
from tests.fixtures.database import database_for
from tests.helpers import make_image, run_cli

MODEL = "open_clip-tiny-test"
CATEGORIES = ("boats", "cats", "maps")


@dataclass
class Catalog:
    url: str
    settings: Settings
    database: Database
    folder: Path
    ids: dict[str, int]  # file name -> image id


@pytest.fixture(scope="module")
def catalog(create_database) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_search_e2e")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-search-e2e-"))
    settings = Settings(
        database_url=url,
        data_dir=folder / "data",
        model=MODEL,
        search_exact_max_rows=4,
        faiss_flat_max_rows=4,
        search_two_stage_min_rows=0,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]
    database = database_for(settings)
    embedder = get_embedder(MODEL)
    ids: dict[str, int] = {}
    for c, category in enumerate(CATEGORIES):
        files = [(f"{category}-{i}.png", make_image(100 * c + i, size=(64 + 8 * c, 48))) for i in range(8)]
        for name, data in files:
            (folder / name).write_bytes(data)
        with database.session() as session:
            outcomes = ingest_bytes(session, embedder, files, settings=settings, category=category)
        for name, outcome in zip([f[0] for f in files], outcomes, strict=True):
            assert outcome.image_id is not None
            ids[name] = int(outcome.image_id)
    yield Catalog(url, settings, database, folder, ids)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def client(catalog: Catalog) -> Iterator[TestClient]:
    with TestClient(create_app(catalog.settings, database=catalog.database)) as c:
        yield c


def test_the_server_warms_search_in_the_background_after_start(catalog: Catalog) -> None:
    """/health answers at once; prototypes, the FAISS index and the buffers are loaded without any search."""
    settings = catalog.settings.model_copy(update={"search_warmup": True, "search_backend": "faiss"})
    app = create_app(settings, database=catalog.database)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        report = app.state.search_warmup
        assert report.done.wait(120)
        assert c.get("/health/ready").json()["search_warm"] is True
        runtime = app.state.search_runtime
        assert report.error is None and report.model == MODEL and report.faiss_loaded and report.searched
        assert report.prewarmed_bytes == 0  # FAISS answers: pgvector's graphs would only evict its pages
        assert report.inference == "torch"  # the model was loaded too (tests run IMSRC_INFERENCE=torch)
        assert runtime.prototypes.loads == 1 and len(runtime.faiss._indexes) == 1
        resp = c.get(f"/api/search/similar/{catalog.ids['cats-3.png']}?k=3")
        assert resp.status_code == 200 and resp.json()["backend"] == "faiss"
        assert runtime.prototypes.loads == 1  # the search used what the warm-up loaded


def test_a_pgvector_server_warms_its_graphs_and_not_faiss(catalog: Catalog) -> None:
    settings = catalog.settings.model_copy(update={"search_warmup": True, "search_backend": "pgvector"})
    app = create_app(settings, database=catalog.database)
    with TestClient(app) as c:
        report = app.state.search_warmup
        assert report.done.wait(120)
        assert c.get("/health/ready").json()["search_warm"] is True
        assert report.error is None and report.searched and not report.faiss_loaded
        assert report.prewarmed_bytes > 0
        assert app.state.search_runtime.faiss._indexes == {}


def test_upload_search_finds_the_same_image_first(client: TestClient, catalog: Catalog) -> None:
    name = "cats-3.png"
    for backend in ("pgvector", "faiss"):
        resp = client.post(
            f"/api/search/image?k=5&backend={backend}",
            files={"file": (name, (catalog.folder / name).read_bytes(), "image/png")},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        top = body["results"][0]
        assert top["id"] == catalog.ids[name] and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert top["category"] == "cats" and top["duplicates"] == 0
        # what a result card shows: the file's name, dimensions and size (the page labelled it "Image N")
        data = (catalog.folder / name).read_bytes()
        assert top["original_name"] == name and top["byte_size"] == len(data)
        assert (top["width"], top["height"]) == PILImage.open(io.BytesIO(data)).size
        assert top["thumbnail_url"] == f"/api/images/{top['id']}/thumbnail"
        assert top["file_url"] == f"/api/images/{top['id']}/file"
        assert len(body["results"]) == 5 and body["model"] == MODEL and body["mode"] == "two_stage"
        assert body["backend"] == backend and body["stage1"]
        assert set(body["timings_ms"]) == {"embed", "stage1", "stage2", "rerank", "total"}
        # mode, match and the comparator are named in every response (issue 18, item 4)
        assert body["match"] == "whole" and body["rerank"] is None and body["timings_ms"]["rerank"] == 0
        assert top["match_type"] == "duplicate" and top["box"] is None


def test_search_modes_filters_and_categories_only(client: TestClient, catalog: Catalog) -> None:
    data = (catalog.folder / "maps-1.png").read_bytes()
    exact = client.post("/api/search/image?k=24&mode=exact", files={"file": ("q.png", data)}).json()
    assert len(exact["results"]) == 24 and exact["backend"] is None and exact["stage1"] == []
    scores = [r["score"] for r in exact["results"]]
    assert scores == sorted(scores, reverse=True)
    only = client.post("/api/search/image?k=8&category=boats", files={"file": ("q.png", data)}).json()
    assert len(only["results"]) == 8 and {r["category"] for r in only["results"]} == {"boats"}
    assert only["stage1"] == []
    cats = client.post("/api/search/categories", files={"file": ("q.png", data)}).json()
    assert {c["category"] for c in cats["categories"]} == set(CATEGORIES)
    assert [c["score"] for c in cats["categories"]] == sorted((c["score"] for c in cats["categories"]), reverse=True)


def test_text_and_similar(client: TestClient, catalog: Catalog) -> None:
    text = client.get("/api/search/text", params={"q": "a boat on the sea", "k": 3}).json()
    assert len(text["results"]) == 3 and text["model"] == MODEL
    target = catalog.ids["boats-2.png"]
    similar = client.get(f"/api/search/similar/{target}", params={"k": 4, "mode": "exact"}).json()
    assert len(similar["results"]) == 4 and target not in [r["id"] for r in similar["results"]]
    missing = client.get("/api/search/similar/999999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_bad_requests_get_clear_json_errors(client: TestClient) -> None:
    resp = client.post("/api/search/image", files={"file": ("x.png", b"not an image")})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "not_an_image"
    resp = client.post("/api/search/image", json={"url": "http://127.0.0.1:9/x.png"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "url_not_allowed"
    resp = client.post("/api/search/image", json={"url": "file:///etc/passwd"})
    assert resp.status_code == 400 and "only http and https" in resp.json()["error"]["message"]
    resp = client.post("/api/search/image", content=b"raw", headers={"content-type": "image/png"})
    assert resp.status_code == 422 and "multipart" in resp.json()["error"]["message"]
    resp = client.post("/api/search/image?categories=lots", files={"file": ("x.png", make_image(1))})
    assert resp.status_code == 422 and "categories" in resp.json()["error"]["message"]
    resp = client.post("/api/search/image?category=nope", files={"file": ("x.png", make_image(1))})
    assert resp.status_code == 404 and "nope" in resp.json()["error"]["message"]
    resp = client.get("/api/search/text", params={"q": "x", "mode": "fast"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_input"


def test_openapi_describes_search(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/api/search/image", "/api/search/text", "/api/search/similar/{image_id}", "/api/search/categories"):
        assert path in spec["paths"]
    body = spec["paths"]["/api/search/image"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    hit = spec["components"]["schemas"]["SearchHit"]["properties"]
    assert {"id", "score", "category", "thumbnail_url", "file_url", "duplicates"} <= set(hit)


def test_cli_search_round_trips(catalog: Catalog) -> None:
    env = {"IMSRC_DATABASE_URL": catalog.url, "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"), "IMSRC_MODEL": MODEL}
    name = "boats-5.png"
    res = run_cli("search", "image", str(catalog.folder / name), "-k", "3", "--json", env=env)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["results"][0]["id"] == catalog.ids[name] and len(body["results"]) == 3
    res = run_cli("similar", str(catalog.ids[name]), "-k", "2", "--exact", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["results"]) == 2
    res = run_cli("categories", "list", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert {c["name"] for c in json.loads(res.stdout)} >= set(CATEGORIES)
    res = run_cli("search", "text", "a map", "--category", "nosuch", env=env)
    assert res.returncode == 1 and "no category named 'nosuch'" in res.stderr
    assert "Traceback" not in res.stderr
