"""The write path (issue 13, and the write-path items of issue 12): bugs found while walking an upload, an
`imsrc embed` and a model removal from the entry point to their rows. Each test failed on the code before."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.api.limits import MAX_BODY_BYTES
from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.ingest.embed_missing import embed_missing
from imsrc.ingest.pipeline import run_index_job
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.search.sync import sync_search
from imsrc.services.models import ModelService
from tests.helpers import run_cli
from tests.ingest_support import TEST_MODEL, make_image, open_test_database, write
from tests.search_data import make_catalog

# The tiny test architecture and seed under another name: the same pixels give the same vectors.
TWIN = "open_clip:imsrc-tiny-test:none"


@pytest.fixture()
def split_db(create_database, scratch: Path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    # prototype_min_gain 0: any category of 20+ members is split into k-means prototypes.
    database = open_test_database(create_database("imsrc_write"), scratch / "data", prototype_min_gain=0.0)
    yield database
    database.dispose()


def _prototypes(db: Database, model: str) -> list[tuple[str, str, int, int]]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.name, p.kind, p.ordinal, p.member_count FROM category_prototypes p"
                " JOIN categories c ON c.id = p.category_id JOIN embedding_models m ON m.id = p.model_id"
                " WHERE m.name = :n AND p.kind IN ('mean', 'cluster') ORDER BY 1, 2, 3"
            ),
            {"n": model},
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_embed_builds_the_new_models_cluster_prototypes(split_db: Database, scratch: Path) -> None:
    # embed_missing used to compute the new model's means before sync_search, which then found no category
    # stale and never built its k-means prototypes: the second model searched with means only.
    for i in range(24):
        write(scratch / "shoes" / f"s{i}.png", make_image(700 + i, (64, 48)))
    run_index_job(split_db, get_embedder(TEST_MODEL), [str(scratch / "shoes")], category="shoes", workers=1)
    first = _prototypes(split_db, TEST_MODEL)
    assert [k for _, k, _, _ in first].count("cluster") >= 2  # the catalog's first model has them

    summary = embed_missing(split_db, get_embedder(TWIN), workers=1, batch_size=8)
    assert summary.embedded == 24
    assert _prototypes(split_db, TWIN) == first  # same vectors, same prototypes, clusters included


def test_removing_a_model_drops_its_per_category_indexes(session: Session, settings: Settings) -> None:
    # ModelRepository.remove dropped only the catalog-wide HNSW index; the per-category ones stayed behind.
    cat = make_catalog(session, n_categories=2, per_category=30, dimension=16, name="removed-model")
    sync_search(session, settings.model_copy(update={"search_exact_max_rows": 10}), model_id=cat.model.id)
    neighbours = NeighbourRepository(session)
    assert set(neighbours.category_indexes(cat.model.id)) == set(cat.category_ids)

    models = ModelRepository(session)
    models.set_active(models.register(name="kept-model", dimension=16, family="test", params={}, supports_text=False))
    ModelService(session, settings).remove(cat.model.name)
    left = (
        session.execute(
            text(
                "SELECT indexname FROM pg_indexes"
                " WHERE (tablename = 'embeddings' OR tablename LIKE 'category_vectors%') AND indexname ~ :p"
            ),
            {"p": f"_m{cat.model.id}(_|$)"},
        )
        .scalars()
        .all()
    )
    assert left == []


def test_cli_rename_goes_through_the_category_service(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    # `imsrc categories rename` wrote the name itself: a taken name was another error than the API's 409
    # conflict, and search never heard of the new name (no text prototype for a CLIP model).
    db = open_test_database(create_database("imsrc_rename"), scratch / "data")
    with db.session() as s:
        models = ModelRepository(s)
        models.set_active(
            models.register(name=TEST_MODEL, dimension=64, family="open_clip", params={}, supports_text=True)
        )
        cats = CategoryRepository(s)
        cat_id = cats.create("cats").id
        cats.create("dogs")
    env = {"IMSRC_DATABASE_URL": db.url, "IMSRC_DATA_DIR": str(scratch / "cli"), "IMSRC_MODEL": TEST_MODEL}

    taken = run_cli("categories", "rename", "cats", "DOGS", env=env)
    assert taken.returncode == 1 and "a category named 'DOGS' already exists" in taken.stderr

    done = run_cli("categories", "rename", str(cat_id), "kittens", env=env)
    assert done.returncode == 0, done.stderr
    with db.engine.connect() as conn:
        name = conn.execute(text("SELECT name FROM categories WHERE id = :c"), {"c": cat_id}).scalar_one()
        text_protos = conn.execute(
            text("SELECT count(*) FROM category_prototypes WHERE category_id = :c AND kind = 'text'"), {"c": cat_id}
        ).scalar_one()
    db.dispose()
    assert (name, text_protos) == ("kittens", 1)


def _upload(client: TestClient, name: str, data: bytes, category: str | None = None) -> dict[str, Any]:
    response = client.post(
        "/api/images", data={"category": category} if category else {}, files=[("file", (name, data, "image/png"))]
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def _category_count(session: Session, name: str) -> int:
    return int(
        session.execute(text("SELECT count(*) FROM categories WHERE lower(name) = lower(:n)"), {"n": name}).scalar_one()
    )


def test_reuploading_known_bytes_answers_their_real_category(client: TestClient, session: Session) -> None:
    # Issue 12, item 11: the answer named the category the re-upload asked for (and created it, empty) while
    # the image stayed where it was.
    data = make_image(811, (80, 60))
    first = _upload(client, "cat.png", data, "Cats")
    assert first["status"] == "new" and first["category"]["name"] == "Cats"
    again = _upload(client, "dog.png", data, "Dogs")
    assert (again["status"], again["exact"], again["id"]) == ("duplicate", True, first["id"])
    assert again["category"] == first["category"]
    assert _category_count(session, "Dogs") == 0
    assert client.get(f"/api/images/{first['id']}").json()["category"]["name"] == "Cats"
    # Without a category an upload joins an automatic group, and the answer names it.
    loose = _upload(client, "loose.png", make_image(812, (80, 60)))
    assert loose["category"] == client.get(f"/api/images/{loose['id']}").json()["category"]
    assert loose["category"]["name"].startswith("auto-")


async def _asgi(
    app: Any, method: str, path: str, headers: dict[str, str], chunks: list[bytes]
) -> tuple[int, dict[str, Any], int]:
    """Drive the app the way a server does, counting how much of the body it read: (status, JSON, bytes read)."""
    read = 0
    pending = list(chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), json.loads(body), read


MB = 1024 * 1024


def _multipart(size: int, boundary: str = "imsrcboundary") -> list[bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + b"\x89PNG\r\n\x1a\n" + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    return [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]


def test_search_upload_streams_and_stops_with_413(client: TestClient) -> None:
    # Issue 12, item 4 / issue 13: POST /api/search/image spooled the whole multipart body before looking at
    # its size, then answered 422; it now streams like POST /api/images and stops at the limit.
    app = client.app
    app.state.settings = app.state.settings.model_copy(update={"max_upload_bytes": 100_000})  # type: ignore[attr-defined]
    chunks = _multipart(8 * MB)
    status, body, read = asyncio.run(
        _asgi(app, "POST", "/api/search/image", {"content-type": "multipart/form-data; boundary=imsrcboundary"}, chunks)
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert read < MB  # stopped near the limit, not after 8 MB


def test_json_bodies_are_capped_without_reading_them_whole(client: TestClient) -> None:
    # Issue 12, item 3: a JSON body to /api/search/image was read whole (400 MB: +1.5 GB of memory).
    huge = client.post("/api/search/image", json={"url": "https://example.org/" + "a" * 40_000})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    stream = [b'{"url": "https://example.org/' + b"a" * 64 * 1024] * 64  # 4 MB, no Content-Length
    status, _, read = asyncio.run(
        _asgi(client.app, "POST", "/api/search/image", {"content-type": "application/json"}, stream)
    )
    assert status == 413 and read <= MAX_BODY_BYTES + 64 * 1024
    declared = {"content-type": "application/json", "content-length": str(400 * MB)}
    status, _, read = asyncio.run(_asgi(client.app, "POST", "/api/categories", declared, stream))
    assert (status, read) == (413, 0)  # refused on the declared length alone
    small = client.post("/api/categories", json={"name": "Small enough", "description": "d" * 2000})
    assert small.status_code == 201, small.text
