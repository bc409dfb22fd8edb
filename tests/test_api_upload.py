"""POST /api/images through the real ingest pipeline and the tiny CLIP model: on the rolled-back test transaction,
and concurrent uploads on a committed database of their own."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database
from tests.fixtures.database import fresh_database
from tests.helpers import make_image


@pytest.fixture(scope="module")
def committed(create_database, settings: Settings) -> Iterator[tuple[TestClient, Database]]:  # type: ignore[no-untyped-def]
    db = fresh_database(create_database, settings, "imsrc_upload")
    with TestClient(create_app(db.settings, database=db)) as c:
        yield c, db
    db.dispose()


def _scalar(session: Session, sql: str, **params: object) -> object:
    return session.execute(text(sql), params).scalar_one()


def _jpeg(data: bytes) -> bytes:
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_upload_new_failed_duplicates_and_delete(client: TestClient, session: Session) -> None:
    one, two = make_image(301, size=(128, 96)), make_image(302, size=(128, 96))
    response = client.post(
        "/api/images",
        data={"category": " Uploads "},
        files=[
            ("file", ("one.png", one, "image/png")),
            ("file", ("two.png", two, "image/png")),
            ("file", ("broken.jpg", b"\xff\xd8\xff not really a jpeg", "image/jpeg")),
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["new"], body["duplicates"], body["failed"]) == (2, 0, 1)
    by_name = {r["filename"]: r for r in body["results"]}
    assert by_name["one.png"]["status"] == by_name["two.png"]["status"] == "new"
    assert by_name["broken.jpg"]["status"] == "failed" and by_name["broken.jpg"]["reason"]
    assert by_name["broken.jpg"]["id"] is None
    first = by_name["one.png"]["id"]
    assert by_name["one.png"]["category"]["name"] == "Uploads"
    assert by_name["one.png"]["thumbnail_url"] == f"/api/images/{first}/thumbnail"
    # everything for each new image landed: bytes, thumbnail, vector, category, prototype
    for table in ("image_blobs", "thumbnails", "embeddings"):
        assert _scalar(session, f"SELECT count(*) FROM {table} WHERE image_id = :i", i=first) == 1, table
    assert client.get(f"/api/images/{first}/file").content == one
    detail = client.get(f"/api/images/{first}").json()
    assert detail["models"] == ["open_clip-tiny-test"] and detail["category"]["name"] == "Uploads"
    cat_id = detail["category"]["id"]
    protos = {p["kind"]: p for p in client.get(f"/api/categories/{cat_id}").json()["prototypes"]}
    assert (protos["mean"]["model"], protos["mean"]["member_count"]) == ("open_clip-tiny-test", 2)
    assert protos["text"]["count"] == 1  # the tiny CLIP reads text: the category's name is a prototype too

    # identical bytes: nothing stored, pointed at the existing image; a re-encoding: a near-duplicate
    again = client.post(
        "/api/images", files=[("file", ("copy.png", one, "image/png")), ("file", ("one.jpg", _jpeg(one), "image/jpeg"))]
    ).json()
    exact, near = again["results"]
    assert exact["status"] == "duplicate" and exact["exact"] is True and exact["duplicate_of"] == first
    assert near["status"] == "duplicate" and near["exact"] is False and near["duplicate_of"] == first
    assert near["id"] != first
    assert (
        _scalar(
            session, "SELECT count(*) FROM images WHERE sha256 = (SELECT sha256 FROM images WHERE id = :i)", i=first
        )
        == 1
    )
    assert client.get(f"/api/images/{first}").json()["duplicates"][0]["id"] == near["id"]

    # deleting the canonical promotes the near-duplicate and keeps the mean prototype current
    deleted = client.delete(f"/api/images/{first}").json()
    assert deleted["new_canonical_id"] == near["id"]
    protos = {p["kind"]: p for p in client.get(f"/api/categories/{cat_id}").json()["prototypes"]}
    assert protos["mean"]["member_count"] == 1
    assert _scalar(session, "SELECT count(*) FROM embeddings WHERE image_id = :i", i=first) == 0


def test_upload_without_category_and_with_odd_names(client: TestClient) -> None:
    response = client.post("/api/images", files=[("file", ("../../évil name.png", make_image(310), "image/png"))])
    result = response.json()["results"][0]
    # no category asked for: the answer names the automatic group the image joined
    assert result["status"] == "new" and result["category"]["name"].startswith("auto-")
    assert result["filename"] == "évil name.png"
    assert client.get(f"/api/images/{result['id']}").json()["original_name"] == "évil name.png"


def test_concurrent_uploads_all_succeed(committed: tuple[TestClient, Database]) -> None:
    # Two uploads at once once deadlocked on the embeddings table (each holding CREATE INDEX IF NOT EXISTS's
    # SHARE lock while waiting to COPY); both must land.
    from concurrent.futures import ThreadPoolExecutor

    client, _ = committed

    def upload(i: int) -> tuple[int, str]:
        r = client.post(
            "/api/images",
            data={"category": "Concurrent"},
            files=[("file", (f"c{i}.png", make_image(400 + i, size=(96, 72)), "image/png"))],
        )
        return r.status_code, r.json()["results"][0]["status"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(upload, range(8)))
    assert results == [(200, "new")] * 8


def _server_timing(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in ",".join(values).split(","):
        name, _, rest = part.strip().partition(";dur=")
        out[name] = float(rest)
    return out


def test_an_upload_says_where_its_time_went(client: TestClient) -> None:
    """README: an upload's answer carries Server-Timing with its stages, and every answer the time inside the app."""
    response = client.post(
        "/api/images", data={"category": "Timed"}, files=[("file", ("t.png", make_image(311), "image/png"))]
    )
    assert response.status_code == 200, response.text
    stages = _server_timing(response.headers.get_list("server-timing"))
    expected = {"receive", "queue", "connect", "model", "decode", "embed", "write", "sync", "commit", "route", "app"}
    assert expected <= set(stages) and all(ms >= 0 for ms in stages.values()), stages
    # Sequential stages inside the route (headers round to 0.1 ms), and the route inside the app.
    inside = ("queue", "decode", "embed", "write", "sync")
    assert sum(stages[name] for name in inside) <= stages["route"] + 1
    assert stages["route"] <= stages["app"] + 1
    listing = client.get("/api/images")
    assert set(_server_timing(listing.headers.get_list("server-timing"))) == {"app"}
