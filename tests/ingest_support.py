"""Helpers for the ingest tests: real image folders, catalog snapshots, the indexer as a subprocess. Their
committed databases come from tests.fixtures.database.open_test_database."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.engine import make_url

from imsrc.db.session import Database
from tests.fixtures.database import TEST_MODEL, open_test_database
from tests.helpers import ROOT, make_image


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reencode(data: bytes, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, fmt, **kw)
    return buf.getvalue()


def snapshot(db: Database) -> dict[str, Any]:
    """The catalog in terms of content, not ids (ids may differ after a crash: sequences skip)."""
    with db.engine.connect() as conn:
        images = (
            conn.execute(
                text(
                    "SELECT encode(i.sha256, 'hex') AS sha, i.phash::text AS phash, i.width, i.height, i.format,"
                    " i.byte_size, i.original_name, i.source_path, c.name AS category,"
                    " encode(ci.sha256, 'hex') AS canonical, encode(sha256(t.data), 'hex') AS thumb,"
                    " (b.image_id IS NOT NULL) AS stored FROM images i LEFT JOIN categories c ON c.id = i.category_id"
                    " LEFT JOIN images ci ON ci.id = i.canonical_id LEFT JOIN thumbnails t ON t.image_id = i.id"
                    " LEFT JOIN image_blobs b ON b.image_id = i.id"
                )
            )
            .mappings()
            .all()
        )
        vectors = conn.execute(
            text(
                "SELECT encode(i.sha256, 'hex') AS sha, m.name AS model, e.embedding::text AS v FROM embeddings e"
                " JOIN images i ON i.id = e.image_id JOIN embedding_models m ON m.id = e.model_id"
            )
        ).all()
        sources = conn.execute(
            text("SELECT s.path, encode(i.sha256, 'hex') FROM image_sources s JOIN images i ON i.id = s.image_id")
        ).all()
        prototypes = conn.execute(
            text(
                "SELECT c.name, m.name, p.kind, p.ordinal, p.member_count, p.vector::text FROM category_prototypes p"
                " JOIN categories c ON c.id = p.category_id JOIN embedding_models m ON m.id = p.model_id"
            )
        ).all()
        categories = conn.execute(text("SELECT name FROM categories")).scalars().all()
    return {
        "images": sorted(tuple(sorted(r.items())) for r in images),
        "vectors": {(r.sha, r.model): np.array(r.v.strip("[]").split(","), dtype=np.float32) for r in vectors},
        "sources": sorted(sources),
        "prototypes": sorted((r[0], r[1], r[2], r[3], r[4]) for r in prototypes),
        "prototype_vectors": {
            (r[0], r[1]): np.array(r[5].strip("[]").split(","), dtype=np.float32) for r in prototypes
        },
        "categories": sorted(categories),
    }


def index_command(root: Path) -> list[str]:
    """`imsrc index` of a folder as a subprocess command line (crash/resume tests kill it)."""
    return [
        sys.executable,
        "-m",
        "imsrc.cli.main",
        "index",
        str(root),
        "--category-from-folder",
        "--workers",
        "2",
        "--batch-size",
        "4",
        "--json",
    ]


def cli_env(url: str, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_") or k == "IMSRC_INFERENCE"}
    env.update(
        {
            "IMSRC_DATABASE_URL": url,
            "IMSRC_DATA_DIR": str(data),
            "IMSRC_MODEL": TEST_MODEL,
            "PYTHONPATH": str(ROOT / "backend"),
        }
    )
    return env


def psycopg_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "TEST_MODEL",
    "cli_env",
    "index_command",
    "make_image",
    "open_test_database",
    "psycopg_url",
    "reencode",
    "sha",
    "snapshot",
    "write",
]


class CrashOnWidth13:
    """A picklable 'preprocess' that kills its worker process on 13-pixel-wide images, the way a decoder
    bug in a native library would (os._exit: no exception, no cleanup)."""

    def __call__(self, img: Image.Image) -> np.ndarray:
        if img.width == 13:
            os._exit(3)
        return np.zeros((3, 4, 4), dtype=np.float32)
