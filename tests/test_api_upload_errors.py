"""POST /api/images: the errors raised while reading the multipart body, before anything is ingested."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.api.multipart import read_multipart
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.errors import InvalidInputError, PayloadTooLargeError
from tests.helpers import make_image


def test_oversized_file_is_413_and_nothing_is_written(settings: Settings, database: Database, session: Session) -> None:
    before = session.execute(text("SELECT count(*) FROM images")).scalar_one()
    app = create_app(settings.model_copy(update={"max_upload_bytes": 1000}), database=database)
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        big = make_image(1, size=(200, 200))
        assert len(big) > 1000
        response = c.post(
            "/api/images",
            files=[
                ("file", ("a.png", make_image(2, size=(8, 8)), "image/png")),
                ("file", ("big.png", big, "image/png")),
            ],
        )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and "big.png" in error["message"]
    assert session.execute(text("SELECT count(*) FROM images")).scalar_one() == before


def test_not_multipart_no_files_and_wrong_field(client: TestClient) -> None:
    response = client.post("/api/images", json={"file": "x"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post("/api/images", data={"category": "x"}, files=[])
    assert response.status_code in (415, 422)
    response = client.post("/api/images", files={"category": (None, "cats")})
    assert response.status_code == 422 and "no files" in response.json()["error"]["message"]
    response = client.post("/api/images", files={"image": ("a.png", make_image(3), "image/png")})
    assert response.status_code == 422 and "'file' field" in response.json()["error"]["message"]


def test_malformed_multipart_is_422(client: TestClient) -> None:
    response = client.post(
        "/api/images", content=b"--zzz\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=zzz"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"


async def _chunks(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0und") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_reader_streams_files_to_disk_in_small_chunks(scratch: Path) -> None:
    one, two = make_image(5), make_image(6)
    body = _multipart([("category", None, b"Birds"), ("file", "../../etc/one.png", one), ("file", "two.png", two)])
    form = asyncio.run(
        read_multipart(
            "multipart/form-data; boundary=b0und",
            _chunks(body),
            scratch,
            file_field="file",
            max_file_bytes=10**6,
            max_files=10,
        )
    )
    assert form.fields == {"category": "Birds"}
    # the client's path is never used: only the base name survives, the bytes live in our temp dir
    assert [f.filename for f in form.files] == ["one.png", "two.png"]
    assert [f.path.read_bytes() for f in form.files] == [one, two]
    assert all(f.path.parent == scratch for f in form.files)


def test_reader_limits_file_count_and_size(scratch: Path) -> None:
    body = _multipart([("file", f"{i}.png", b"x" * 10) for i in range(3)])
    with pytest.raises(PayloadTooLargeError, match="at most 2 files"):
        asyncio.run(
            read_multipart(
                "multipart/form-data; boundary=b0und",
                _chunks(body),
                scratch,
                file_field="file",
                max_file_bytes=100,
                max_files=2,
            )
        )
    with pytest.raises(PayloadTooLargeError, match="upload limit of 5 bytes"):
        asyncio.run(
            read_multipart(
                "multipart/form-data; boundary=b0und",
                _chunks(body),
                scratch,
                file_field="file",
                max_file_bytes=5,
                max_files=10,
            )
        )
    with pytest.raises(InvalidInputError, match="boundary"):
        asyncio.run(
            read_multipart(
                "multipart/form-data", _chunks(body), scratch, file_field="file", max_file_bytes=5, max_files=10
            )
        )
