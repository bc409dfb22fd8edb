"""/api/images: list, detail, file, thumbnail, delete, with errors."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import CategoryRepository
from imsrc.ingest.repository import JobRepository
from tests.fixtures.api import add_image
from tests.helpers import make_image


def test_list_filters_and_pages(client: TestClient, session: Session) -> None:
    cats = CategoryRepository(session)
    birds = cats.get_or_create("Birds")
    boats = cats.get_or_create("Boats")
    a = add_image(session, 1, category_id=birds.id)
    b = add_image(session, 2, category_id=birds.id, canonical_id=a.id)
    c = add_image(session, 3, category_id=boats.id)

    body = client.get("/api/images", params={"category_id": birds.id}).json()
    assert body["total"] == 2 and [i["id"] for i in body["items"]] == [b.id, a.id]
    first = {i["id"]: i for i in body["items"]}
    assert first[a.id]["duplicate_count"] == 1 and first[b.id]["canonical_id"] == a.id
    assert first[a.id]["category"] == {"id": birds.id, "name": "Birds"}
    assert first[a.id]["thumbnail_url"] == f"/api/images/{a.id}/thumbnail"

    by_name = client.get("/api/images", params={"category": "birds", "duplicates": "exclude"}).json()
    assert [i["id"] for i in by_name["items"]] == [a.id]
    only = client.get("/api/images", params={"category": "Birds", "duplicates": "only"}).json()
    assert [i["id"] for i in only["items"]] == [b.id]

    everything = client.get("/api/images", params={"page_size": 2}).json()
    assert everything["total"] >= 3 and len(everything["items"]) == 2 and everything["items"][0]["id"] == c.id
    page2 = client.get("/api/images", params={"page_size": 2, "page": 2}).json()
    assert page2["page"] == 2 and page2["items"][0]["id"] not in {i["id"] for i in everything["items"]}


def test_list_rejects_absurd_paging_and_unknown_category(client: TestClient) -> None:
    for params in ({"page": 0}, {"page_size": 0}, {"page_size": 10_000}, {"page": "x"}, {"duplicates": "maybe"}):
        response = client.get("/api/images", params=params)
        assert response.status_code == 422, params
        assert response.json()["error"]["code"] == "invalid_input"
    missing = client.get("/api/images", params={"category": "no such category"})
    assert missing.status_code == 404 and "no such category" in missing.json()["error"]["message"]
    assert client.get("/api/images", params={"category_id": 999_999_999}).status_code == 404


def test_detail_has_category_prediction_duplicates_and_models(client: TestClient, session: Session) -> None:
    cats = CategoryRepository(session)
    birds, boats = cats.get_or_create("Birds"), cats.get_or_create("Boats")
    a = add_image(session, 11, category_id=birds.id)
    a.predicted_category_id, a.predicted_score = boats.id, 0.87
    dup = add_image(session, 12, canonical_id=a.id)
    session.flush()
    session.execute(text("INSERT INTO embedding_models (name, dimension, family) VALUES ('m-detail', 3, 'test')"))
    session.execute(
        text(
            "INSERT INTO embeddings (model_id, image_id, embedding) SELECT id, :i, '[1,0,0]' "
            "FROM embedding_models WHERE name = 'm-detail'"
        ),
        {"i": a.id},
    )

    body = client.get(f"/api/images/{a.id}").json()
    assert body["sha256"] == hashlib.sha256(make_image(11)).hexdigest()
    assert body["category"]["name"] == "Birds"
    assert body["predicted_category"] == {"id": boats.id, "name": "Boats"} and body["predicted_score"] == 0.87
    assert [d["id"] for d in body["duplicates"]] == [dup.id] and body["canonical"] is None
    assert body["models"] == ["m-detail"] and body["stored_in_database"] is True
    assert (body["width"], body["height"], body["format"]) == (96, 64, "PNG")
    assert body["file_url"] == f"/api/images/{a.id}/file"

    dup_body = client.get(f"/api/images/{dup.id}").json()
    assert dup_body["canonical"]["id"] == a.id and dup_body["category"] is None


def test_detail_unknown_and_bad_ids(client: TestClient) -> None:
    response = client.get("/api/images/987654321")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get("/api/images/abc").status_code == 422
    assert client.get("/api/images/0").status_code == 422
    assert client.get("/api/images/99999999999999999999999").status_code == 422


def test_file_serves_stored_bytes_with_content_type(client: TestClient, session: Session) -> None:
    png = add_image(session, 21, name="cat photo.png")
    jpg = add_image(session, 22, fmt="JPEG")
    response = client.get(f"/api/images/{png.id}/file")
    assert response.status_code == 200 and response.content == make_image(21)
    assert response.headers["content-type"] == "image/png"
    assert "cat%20photo.png" in response.headers["content-disposition"]
    assert response.headers["x-content-type-options"] == "nosniff"
    jpeg = client.get(f"/api/images/{jpg.id}/file")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert PILImage.open(io.BytesIO(jpeg.content)).format == "JPEG"


def test_file_serves_referenced_file_only_while_it_exists(client: TestClient, session: Session, scratch: Path) -> None:
    ref = add_image(session, 31, stored=False, source_path=scratch / "ref.png")
    # Referenced files are served only from folders an indexing job was given (see catalog/referenced.py).
    JobRepository(session).create(
        kind="index", job_key="ref", paths=[str(scratch)], options={}, model_id=None, model_name=None
    )
    response = client.get(f"/api/images/{ref.id}/file")
    assert response.status_code == 200 and response.content == make_image(31)
    assert response.headers["content-type"] == "image/png"
    (scratch / "ref.png").unlink()
    gone = client.get(f"/api/images/{ref.id}/file")
    assert gone.status_code == 404 and "no longer there" in gone.json()["error"]["message"]
    assert str(scratch) not in gone.text


def test_file_path_traversal_is_not_a_route(client: TestClient) -> None:
    for path in (
        "/api/images/..%2F..%2Fetc%2Fpasswd/file",
        "/api/images/1/../../../etc/passwd",
        "/api/images/%2Fetc%2Fpasswd/file",
    ):
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert b"root:" not in response.content


def test_thumbnail_is_webp_with_cache_headers_and_etag(client: TestClient, session: Session) -> None:
    image = add_image(session, 41)
    response = client.get(f"/api/images/{image.id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert PILImage.open(io.BytesIO(response.content)).format == "WEBP"
    assert "max-age=" in response.headers["cache-control"]
    etag = response.headers["etag"]
    again = client.get(f"/api/images/{image.id}/thumbnail", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    session.execute(text("DELETE FROM thumbnails WHERE image_id = :i"), {"i": image.id})
    missing = client.get(f"/api/images/{image.id}/thumbnail")
    assert missing.status_code == 404 and "no thumbnail" in missing.json()["error"]["message"]
    assert client.get("/api/images/987654321/thumbnail").status_code == 404


def test_delete_repoints_duplicates_and_removes_everything(client: TestClient, session: Session) -> None:
    cat = CategoryRepository(session).get_or_create("Deletes")
    canonical = add_image(session, 51, category_id=cat.id)
    d1 = add_image(session, 52, category_id=cat.id, canonical_id=canonical.id)
    d2 = add_image(session, 53, category_id=cat.id, canonical_id=canonical.id)
    ids = (canonical.id, d1.id, d2.id)  # the delete expires the ORM objects
    response = client.delete(f"/api/images/{ids[0]}")
    assert response.status_code == 200
    assert response.json() == {"id": ids[0], "new_canonical_id": ids[1], "repointed": 1}
    rows = dict(
        session.execute(text("SELECT id, canonical_id FROM images WHERE id = ANY(:ids)"), {"ids": list(ids)}).all()
    )
    assert rows == {ids[1]: None, ids[2]: ids[1]}
    for table in ("image_blobs", "thumbnails", "embeddings"):
        left = session.execute(text(f"SELECT count(*) FROM {table} WHERE image_id = :i"), {"i": ids[0]})
        assert left.scalar_one() == 0, table
    assert client.get(f"/api/images/{ids[0]}").status_code == 404
    again = client.delete(f"/api/images/{ids[0]}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
