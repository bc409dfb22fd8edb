"""Region search (issue 18, item 2): match=partial finds the image a crop was cut from, with the matched box;
without region vectors it is a 409 that says to run `imsrc embed --regions`; the region pass is resumable,
builds the model's region index, and IMSRC_REGIONS=true adds windows to uploads."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as samples
from sqlalchemy import text

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.ingest.embed_regions import embed_regions
from imsrc.ingest.service import ingest_bytes
from imsrc.search.regions import WINDOWS, RegionRepository, index_name
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime
from tests.fixtures.database import database_for
from tests.helpers import run_cli

MODEL = "open_clip-tiny-test"
PHOTOS = ("astronaut", "camera", "coffee", "rocket", "chelsea", "immunohistochemistry", "page", "moon")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(name: str) -> Image.Image:
    arr = getattr(samples, name)()
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


@dataclass
class Catalog:
    url: str
    settings: Settings
    database: Database
    folder: Path
    ids: dict[str, int]


@pytest.fixture(scope="module")
def catalog(create_database) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_regions")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-regions-"))
    settings = Settings(database_url=url, data_dir=folder / "data", model=MODEL, search_warmup=False, _env_file=None)  # type: ignore[call-arg]
    database = database_for(settings)
    files = [(f"{n}.png", _png(_photo(n))) for n in PHOTOS]
    with database.session() as session:
        outcomes = ingest_bytes(session, get_embedder(MODEL), files, settings=settings, category="photos")
    ids = {n: int(o.image_id) for n, o in zip(PHOTOS, outcomes, strict=True)}  # type: ignore[arg-type]
    yield Catalog(url, settings, database, folder, ids)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


def _crop_query(name: str) -> bytes:
    """The top-left quarter of a photo: exactly the first window of the 2x2 grid."""
    img = _photo(name)
    return _png(img.crop((0, 0, img.width // 2, img.height // 2)))


def _region_rows(catalog: Catalog) -> dict[int, int]:
    with catalog.database.session() as session:
        return {
            int(i): int(n)
            for i, n in session.execute(text("SELECT image_id, count(*) FROM region_embeddings GROUP BY 1"))
        }


def test_partial_without_region_vectors_says_what_to_run(catalog: Catalog) -> None:
    assert _region_rows(catalog) == {}
    with TestClient(create_app(catalog.settings, database=catalog.database)) as client:
        resp = client.post("/api/search/image?match=partial", files={"file": ("q.png", _crop_query("rocket"))})
        assert resp.status_code == 409, resp.text
        err = resp.json()["error"]
        assert err["code"] == "no_region_vectors" and "imsrc embed --regions" in err["message"]
        resp = client.post("/api/search/image?match=sideways", files={"file": ("q.png", _crop_query("rocket"))})
        assert resp.status_code == 422
        # Default search is untouched: no box, whole match.
        resp = client.post("/api/search/image?k=3", files={"file": ("q.png", _crop_query("rocket"))})
        body = resp.json()
        assert resp.status_code == 200 and body["match"] == "whole" and body["mode"] == "ann"
        assert all(r["box"] is None for r in body["results"])


def test_region_pass_resumes_and_builds_the_index(catalog: Catalog) -> None:
    stop = threading.Event()
    first = embed_regions(
        catalog.database, get_embedder(MODEL), batch_images=3, stop=stop, on_progress=lambda done, total: stop.set()
    )
    assert first.status == "interrupted" and first.images == 3 and first.remaining == len(PHOTOS) - 3
    env = {"IMSRC_DATABASE_URL": catalog.url, "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"), "IMSRC_MODEL": MODEL}
    res = run_cli("embed", "--regions", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["images"] == len(PHOTOS) - 3 and out["remaining"] == 0 and out["failed"] == 0
    assert out["windows_per_image"] == len(WINDOWS)
    rows = _region_rows(catalog)
    assert set(rows) == set(catalog.ids.values()) and set(rows.values()) == {len(WINDOWS)}
    with catalog.database.session() as session:
        assert session.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": index_name(1)}).scalar()
        boxes = session.execute(text("SELECT min(x0), min(y0), max(x1), max(y1) FROM region_embeddings")).one()
        assert tuple(boxes) == (0.0, 0.0, 1.0, 1.0)
    again = run_cli("embed", "--regions", "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["images"] == 0  # nothing left to do


def test_crop_finds_its_source_with_the_box(catalog: Catalog) -> None:
    query = _crop_query("astronaut")
    runtime = SearchRuntime.create(catalog.settings)
    for mode in ("exact", "ann", "two_stage"):
        with catalog.database.session() as session:
            got = runtime.service(session).search_image(query, SearchOptions(k=3, mode=mode, match="partial"))  # type: ignore[arg-type]
        first = got.results[0]
        assert first.id == catalog.ids["astronaut"] and first.match_type == "partial", (mode, got.results)
        assert first.box == [0.0, 0.0, 0.5, 0.5] and first.score > 0.99
        assert got.match == "partial" and got.mode == ("exact" if mode == "exact" else "ann")
        assert len(got.results) == 3 and len({r.id for r in got.results}) == 3
        assert all(r.box is not None for r in got.results)
    with TestClient(create_app(catalog.settings, database=catalog.database)) as client:
        resp = client.post(
            "/api/search/image?k=2&match=partial&rerank=histogram", files={"file": ("q.png", _crop_query("coffee"))}
        )
        body = resp.json()
        assert resp.status_code == 200, resp.text
        assert body["match"] == "partial" and body["rerank"] == "histogram"
        assert body["results"][0]["id"] == catalog.ids["coffee"] and body["results"][0]["box"] == [0, 0, 0.5, 0.5]
    path = catalog.folder / "crop.png"
    path.write_bytes(_crop_query("rocket"))
    env = {"IMSRC_DATABASE_URL": catalog.url, "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"), "IMSRC_MODEL": MODEL}
    res = run_cli("search", "image", str(path), "--partial", "-k", "2", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["match"] == "partial" and out["results"][0]["id"] == catalog.ids["rocket"]
    assert out["results"][0]["box"] == [0, 0, 0.5, 0.5] and out["results"][0]["match_type"] == "partial"


def test_uploads_get_windows_when_regions_are_on(catalog: Catalog) -> None:
    settings = catalog.settings.model_copy(update={"regions": True})
    img = _photo("coins")
    with TestClient(create_app(settings, database=catalog.database)) as client:
        resp = client.post("/api/images", files={"file": ("coins.png", _png(img), "image/png")})
        assert resp.status_code in (200, 201), resp.text
        new_id = resp.json()["results"][0]["id"]
    assert _region_rows(catalog)[new_id] == len(WINDOWS)
    with catalog.database.session() as session:
        assert RegionRepository(session).missing_count(1) == 0


def test_index_with_regions_on_adds_windows(catalog: Catalog) -> None:
    folder = catalog.folder / "more"
    folder.mkdir()
    for name in ("clock", "text"):
        (folder / f"{name}.png").write_bytes(_png(_photo(name)))
    env = {
        "IMSRC_DATABASE_URL": catalog.url,
        "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"),
        "IMSRC_MODEL": MODEL,
        "IMSRC_REGIONS": "true",
    }
    res = run_cli("index", str(folder), "--category", "more", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["regions"]["images"] == 2 and out["regions"]["failed"] == 0 and out["regions"]["remaining"] == 0
    with catalog.database.session() as session:
        new = [
            int(i)
            for i in session.execute(
                text("SELECT id FROM images WHERE category_id = (SELECT id FROM categories WHERE name = 'more')")
            ).scalars()
        ]
    rows = _region_rows(catalog)
    assert len(new) == 2 and all(rows.get(i) == len(WINDOWS) for i in new)
