"""Hostile and broken input over the API and the CLI. Every case gets a clear 4xx (or a one-line CLI error)
and leaves no partial row, file or vector behind: the catalog is checked after each one."""

from __future__ import annotations

import glob
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image as PILImage
from sqlalchemy import text

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.engine import upgrade
from imsrc.db.session import Database
from tests.fixtures.database import fresh_database
from tests.helpers import make_image, run_cli

SQLISH = "'; DROP TABLE images; --"
COUNTS = (
    "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM image_blobs), (SELECT count(*) FROM thumbnails),"
    " (SELECT count(*) FROM embeddings), (SELECT count(*) FROM categories)"
)


@pytest.fixture(scope="module")
def private_tmp() -> Iterator[str]:
    """Uploads spool to tempfile.gettempdir(): give this module its own, so other processes' uploads
    (parallel test runs) cannot be mistaken for files we left behind."""
    import shutil

    path = tempfile.mkdtemp(prefix="imsrc-hostile-tmp-")
    old, tempfile.tempdir = tempfile.tempdir, path
    yield path
    tempfile.tempdir = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(create_database, settings: Settings, private_tmp: str) -> Iterator[tuple[TestClient, Database]]:  # type: ignore[no-untyped-def]
    db = fresh_database(create_database, settings, "imsrc_hostile", max_upload_bytes=2_000_000, max_pixels=4_000_000)
    with TestClient(create_app(db.settings, database=db)) as client:
        # One good image so search, similar and detail routes have something to work on.
        ok = client.post("/api/images", files={"file": ("good.png", make_image(1, size=(64, 64)), "image/png")})
        assert ok.status_code == 200, ok.text
        yield client, db
    db.dispose()


def _counts(db: Database) -> tuple[int, ...]:
    with db.engine.connect() as conn:
        return tuple(conn.execute(text(COUNTS)).one())


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge 1-bit image: a few KB on the wire, width*height pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 64, 9)  # only the first rows; enough to sniff
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def _pillow_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(make_image(12, size=(32, 24)))).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def _upload(name: str, data: bytes, ctype: str = "image/png") -> Callable[[TestClient], Response]:
    return lambda c: c.post("/api/images", files={"file": (name, data, ctype)})


def _raw(body: bytes, ctype: str) -> Callable[[TestClient], Response]:
    return lambda c: c.post("/api/images", content=body, headers={"Content-Type": ctype})


GOOD = make_image(7, size=(48, 48))
JPEG_HEAD = GOOD[:0] + b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"

CASES: dict[str, tuple[Callable[[TestClient], Response], tuple[int, ...]]] = {
    "corrupt jpeg": (_upload("c.jpg", JPEG_HEAD + os.urandom(2000), "image/jpeg"), (422,)),
    "truncated png": (_upload("t.png", GOOD[: len(GOOD) // 2]), (422,)),
    "zero bytes": (_upload("z.png", b""), (422,)),
    "text named .jpg": (_upload("notes.jpg", b"just some text, not an image\n" * 20, "image/jpeg"), (422,)),
    "polyglot gif/html": (_upload("p.gif", b"GIF89a<script>alert(1)</script>" + b"A" * 200, "image/gif"), (422,)),
    "decompression bomb": (_upload("bomb.png", _png_bomb(30_000, 30_000)), (413, 422)),
    "huge dimensions": (_upload("wide.png", _png_bomb(1_000_000, 8)), (413, 422)),
    "html upload": (_upload("x.html", b"<html><body>hi</body></html>", "text/html"), (422,)),
    "oversized upload": (_upload("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(2_100_000)), (413,)),
    "malformed multipart": (
        _raw(b'--xx\r\nContent-Disposition: form-data; name="file"', "multipart/form-data; boundary=xx"),
        (400, 422),
    ),
    "multipart without boundary": (_raw(b"abc", "multipart/form-data"), (400, 415, 422)),
    "json instead of multipart": (lambda c: c.post("/api/images", json={"file": "AAAA"}), (415, 422)),
    "no file field": (lambda c: c.post("/api/images", files={"category": (None, "x")}), (422,)),
    "absurd k": (lambda c: c.get("/api/search/similar/1", params={"k": 10**9}), (422,)),
    "negative k": (lambda c: c.get("/api/search/text", params={"q": "x", "k": -5}), (400, 422)),
    "k not a number": (lambda c: c.get("/api/search/similar/1", params={"k": "ten"}), (422,)),
    "absurd page size": (lambda c: c.get("/api/images", params={"page_size": 10**8}), (422,)),
    "page zero": (lambda c: c.get("/api/images", params={"page": 0}), (422,)),
    "unknown image id": (lambda c: c.get("/api/images/987654321"), (404,)),
    "id beyond bigint": (lambda c: c.get(f"/api/images/{2**80}"), (404, 422)),
    "non-numeric id": (lambda c: c.get("/api/images/abc/file"), (404, 422)),
    "delete unknown id": (lambda c: c.delete("/api/images/987654321"), (404,)),
    "similar unknown id": (lambda c: c.get("/api/search/similar/987654321"), (404,)),
    "unknown category filter": (lambda c: c.get("/api/search/similar/1", params={"category": SQLISH}), (404, 422)),
    "sql in text query is just text": (lambda c: c.get("/api/search/text", params={"q": SQLISH}), (200,)),
    "sql in category name": (lambda c: c.post("/api/categories", json={"name": SQLISH}), (201,)),
    "nul byte in category": (lambda c: c.post("/api/categories", json={"name": "bad\x00name"}), (422,)),
    "blank category": (lambda c: c.post("/api/categories", json={"name": "   "}), (422,)),
    "giant category": (lambda c: c.post("/api/categories", json={"name": "x" * 10_000}), (422,)),
    "empty text query": (lambda c: c.get("/api/search/text", params={"q": ""}), (422,)),
    "huge text query": (lambda c: c.get("/api/search/text", params={"q": "a" * 20_000}), (414, 422)),
    "unknown mode": (lambda c: c.get("/api/search/similar/1", params={"mode": "turbo"}), (422,)),
    "unknown model": (lambda c: c.get("/api/search/similar/1", params={"model": "nope"}), (404, 422)),
    "file:// url search": (lambda c: c.post("/api/search/image", json={"url": "file:///etc/passwd"}), (400, 422)),
    "loopback url search": (
        lambda c: c.post("/api/search/image", json={"url": "http://127.0.0.1:1/x.png"}),
        (400, 403, 422),
    ),
    "metadata url search": (
        lambda c: c.post("/api/search/image", json={"url": "http://169.254.169.254/latest/meta-data"}),
        (400, 403, 422),
    ),
    "search with text file": (
        lambda c: c.post("/api/search/image", files={"file": ("q.jpg", b"hello", "image/jpeg")}),
        (422,),
    ),
    "sql-looking filename": (_upload(SQLISH + ".png", b"not an image"), (422,)),
    # Formats Pillow decodes but the documented list leaves out, under image names (issue 12 item 12).
    "tga named .png": (_upload("x.png", _pillow_bytes("TGA")), (422,)),
    "ppm named .jpg": (_upload("x.jpg", _pillow_bytes("PPM"), "image/jpeg"), (422,)),
    "ico upload": (_upload("x.ico", _pillow_bytes("ICO"), "image/x-icon"), (422,)),
    "pcx search": (lambda c: c.post("/api/search/image", files={"file": ("q.png", _pillow_bytes("PCX"))}), (422,)),
    # Pixel counts over the limits, from a header a few hundred bytes long (items 3 and 13).
    "pixel bomb search": (
        lambda c: c.post("/api/search/image", files={"file": ("q.png", _png_bomb(30_000, 30_000))}),
        (422,),
    ),
    "wide pixel bomb search": (
        lambda c: c.post("/api/search/image", files={"file": ("q.png", _png_bomb(5_000_000, 2))}),
        (422,),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request(env: tuple[TestClient, Database], case: str) -> None:
    client, db = env
    make_request, expected = CASES[case]
    before = _counts(db)
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "imsrc-upload-*")))
    response = make_request(client)
    assert response.status_code in expected, (case, response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"] and "Traceback" not in error["message"]
        assert _counts(db) == before, case  # no partial row, vector, thumbnail or blob
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "imsrc-upload-*"))) <= temp_before  # no stray files
    if "pixel bomb" in case:  # said to be too large, not "not an image"
        assert response.json()["error"]["code"] == "image_too_large", response.text
    if case == "sql in category name":
        assert response.json()["name"] == SQLISH and _counts(db)[:4] == before[:4]
    with db.engine.connect() as conn:  # the catalog tables are all still there
        assert conn.execute(text("SELECT to_regclass('images') IS NOT NULL")).scalar_one()


def test_mixed_upload_keeps_the_good_file_and_reports_the_bad(env: tuple[TestClient, Database]) -> None:
    client, db = env
    before = _counts(db)
    response = client.post(
        "/api/images",
        files=[
            ("file", ("fine.png", make_image(8), "image/png")),
            ("file", ("bad.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")),
        ],
    )
    assert response.status_code == 200
    statuses = {r["filename"]: r["status"] for r in response.json()["results"]}
    assert statuses == {"fine.png": "new", "bad.png": "failed"}
    after = _counts(db)
    assert after[:4] == tuple(n + 1 for n in before[:4])


def test_content_decides_the_type_not_the_name_or_header(env: tuple[TestClient, Database]) -> None:
    client, _ = env
    png = make_image(9, size=(40, 30))
    response = client.post("/api/images", files={"file": ("looks-like.txt", png, "text/plain")})
    assert response.status_code == 200 and response.json()["results"][0]["status"] == "new"
    image_id = response.json()["results"][0]["id"]
    served = client.get(f"/api/images/{image_id}/file")
    assert served.headers["content-type"] == "image/png"
    assert served.headers.get("x-content-type-options") == "nosniff"
    detail = client.get(f"/api/images/{image_id}").json()
    assert detail["format"] == "PNG"


def test_bad_utf8_and_path_filenames_are_sanitised(env: tuple[TestClient, Database]) -> None:
    client, _ = env
    boundary = "B0undary"
    data = make_image(10, size=(20, 20))
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="../../\xff\xfe evil\x00.png"\r\n'
        + b"Content-Type: image/png\r\n\r\n"
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = client.post(
        "/api/images", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["status"] == "new"
    name = client.get(f"/api/images/{result['id']}").json()["original_name"]
    assert "/" not in name and "\x00" not in name and ".." not in name


def _bad_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    (folder / "trunc.png").write_bytes(make_image(11)[:40])
    (folder / "bomb.png").write_bytes(_png_bomb(30_000, 30_000))
    buf = io.BytesIO()
    PILImage.new("RGB", (30, 20), (200, 10, 10)).save(buf, "PNG")
    (folder / "ok.png").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def cli_env(create_database) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """A committed catalog with one indexed image, and a folder of bad files."""
    url = create_database("imsrc_hostile_cli")
    upgrade(url)
    root = Path(tempfile.mkdtemp(prefix="imsrc-hostile-"))
    good = root / "good"
    good.mkdir()
    (good / "one.png").write_bytes(make_image(12))
    _bad_files(root / "bad")
    env = {
        "IMSRC_DATABASE_URL": url,
        "IMSRC_DATA_DIR": str(root / "data"),
        "IMSRC_MODEL": "open_clip-tiny-test",
        "ROOT": str(root),
    }
    assert run_cli("index", str(good), env=env).returncode == 0
    yield env
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("index", "/no/such/folder"), "does not exist"),
        (("search", "image", "/no/such/file.jpg"), "file.jpg"),
        (("similar", "987654321"), "987654321"),
        (("search", "text", ""), "query"),
        (("search", "image", "{bad}/text.jpg"), "image"),
        (("sql", "DELETE FROM images"), "read-only"),
        (("models", "use", "no-such-model"), "no-such-model"),
    ],
)
def test_cli_bad_input_is_one_line(cli_env: dict[str, str], args: tuple[str, ...], needle: str) -> None:
    bad = Path(cli_env["ROOT"]) / "bad"
    result = run_cli(*[a.replace("{bad}", str(bad)) for a in args], env=cli_env)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert needle.lower() in lines[0].lower()


def test_cli_index_of_bad_files_records_each_and_keeps_the_good(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    url = create_database("imsrc_hostile_index")
    upgrade(url)
    bad = scratch / "bad"
    _bad_files(bad)
    env = {"IMSRC_DATABASE_URL": url, "IMSRC_DATA_DIR": str(scratch / "data"), "IMSRC_MODEL": "open_clip-tiny-test"}
    result = run_cli("index", str(bad), "--json", env=env)
    assert "Traceback" not in result.stderr
    counts = json.loads(result.stdout)["counts"]
    assert counts["new"] == 1 and counts["failed"] == 4, counts
    rows = json.loads(
        run_cli(
            "sql",
            "SELECT count(*) AS images, sum(array_length(embedded_models, 1)) AS vectors FROM catalog_images",
            "--json",
            env=env,
        ).stdout
    )
    assert rows == [{"images": 1, "vectors": 1}]
