"""Helpers for API tests: put real images (bytes, thumbnail) into the catalog without the ingest pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import Connection
from sqlalchemy.orm import Session, sessionmaker

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.catalog.models import Image, ImageBlob, Thumbnail
from imsrc.config import Settings
from imsrc.db.session import Database
from tests.helpers import make_image


def add_image(session: Session, seed: int, *, category_id: int | None = None, canonical_id: int | None = None,
              stored: bool = True, source_path: Path | None = None, fmt: str = "PNG",
              name: str | None = None) -> Image:
    data = make_image(seed, fmt=fmt)
    if source_path is not None:
        source_path.write_bytes(data)
    pil = PILImage.open(io.BytesIO(data))
    thumb = pil.copy()
    thumb.thumbnail((32, 32))
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, "WEBP")
    image = Image(
        sha256=hashlib.sha256(data).digest(), width=pil.width, height=pil.height, format=pil.format or fmt,
        byte_size=len(data), original_name=name or f"img{seed}.{fmt.lower()}",
        source_path=str(source_path) if source_path else None, category_id=category_id, canonical_id=canonical_id,
    )
    session.add(image)
    session.flush()
    if stored:
        session.add(ImageBlob(image_id=image.id, data=data))
    session.add(Thumbnail(image_id=image.id, data=buf.getvalue(), width=thumb.width, height=thumb.height))
    session.flush()
    return image


def bound_database(database: Database, connection: Connection) -> Database:
    """The test database whose units of work run inside the test's transaction (their commits become
    savepoints), so uploads and other writes that open their own sessions are rolled back with the test."""
    bound = dataclasses.replace(database)
    bound.sessions = sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    return bound


@pytest.fixture()
def client(settings: Settings, database: Database, connection: Connection, session: Session) -> Iterator[TestClient]:
    """The real app on the test database, rolled back after the test: requests share the test's session, and
    writes that open their own units of work (uploads) join its transaction."""
    app = create_app(settings, database=bound_database(database, connection))
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        yield c
