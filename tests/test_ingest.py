"""Indexing a real folder end to end: counts, categories, duplicates, thumbnails, embeddings, prototypes."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.registry import get_embedder
from imsrc.ingest.decode import open_image, phash64
from imsrc.ingest.phash import hamming
from imsrc.ingest.pipeline import run_index_job
from tests.helpers import run_cli
from tests.ingest_support import TEST_MODEL, make_image, open_test_database, reencode, write


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder(TEST_MODEL)


@pytest.fixture()
def db(create_database, scratch: Path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    database = open_test_database(create_database("imsrc_ingest"), scratch / "data")
    yield database
    database.dispose()


def make_library(root: Path) -> dict[str, Path]:
    a = make_image(1, (300, 200), "PNG")
    b = make_image(2, (300, 200), "JPEG")
    files = {
        "a": write(root / "cats" / "a.png", a),
        "b": write(root / "cats" / "b.jpg", b),
        "near_b": write(root / "cats" / "near_b.jpg", reencode(b, "JPEG", quality=60)),
        "k": write(root / "cats" / "kittens" / "k.webp", make_image(3, (300, 200), "WEBP")),
        "c": write(root / "dogs" / "c.gif", make_image(4, (300, 200), "GIF")),
        "d": write(root / "dogs" / "d.bmp", make_image(5, (300, 200), "BMP")),
        "e": write(root / "dogs" / "e.tiff", make_image(6, (300, 200), "TIFF")),
        "big": write(root / "dogs" / "big.png", make_image(7, (600, 400), "PNG")),
        "a_copy": write(root / "dogs" / "a_copy.png", a),
        "broken": write(root / "dogs" / "broken.jpg", b"this is a text file, not a JPEG\n"),
        "top": write(root / "top.png", make_image(8, (300, 200), "PNG")),
    }
    write(root / ".hidden" / "h.png", make_image(9, (300, 200)))
    write(root / "cats" / ".secret.png", make_image(10, (300, 200)))
    write(root / "readme.txt", b"not an image")
    return files


def test_index_folder(db: Database, embedder: Embedder, scratch: Path) -> None:
    root = scratch / "library"
    files = make_library(root)
    near = hamming(
        phash64(open_image(files["b"].read_bytes(), 10**8).convert("RGB")),
        phash64(open_image(files["near_b"].read_bytes(), 10**8).convert("RGB")),
    )
    # The premise: a re-encode (different bytes) that looks the same.
    assert near <= db.settings.duplicate_threshold and files["b"].read_bytes() != files["near_b"].read_bytes()

    summary = run_index_job(
        db, embedder, [str(root)], category_from_folder=True, workers=2, batch_size=4, inline_below=0
    )  # worker processes, as on a big folder
    assert summary.status == "completed"
    assert summary.run_counts == {"new": 8, "duplicate": 1, "linked": 1, "skipped": 0, "failed": 1}
    assert summary.ignored_files == 1  # readme.txt; hidden files are not even looked at

    with db.engine.connect() as conn:
        rows = {
            r.source_path: r
            for r in conn.execute(
                text(
                    "SELECT i.id, i.source_path, c.name AS category, i.canonical_id, i.width, i.height, i.format"
                    " FROM images i LEFT JOIN categories c ON c.id = i.category_id"
                )
            )
        }
        assert len(rows) == 9
        by = {k: rows.get(str(p)) for k, p in files.items()}
        assert by["a_copy"] is None and by["broken"] is None
        assert {k: r.category for k, r in by.items() if r} == {
            "a": "cats",
            "b": "cats",
            "near_b": "cats",
            "k": "kittens",
            "c": "dogs",
            "d": "dogs",
            "e": "dogs",
            "big": "dogs",
            "top": "library",
        }
        assert {k: r.format for k, r in by.items() if r and k in "abcdek"} == {
            "a": "PNG",
            "b": "JPEG",
            "k": "WEBP",
            "c": "GIF",
            "d": "BMP",
            "e": "TIFF",
        }
        # Near-duplicate points at the earliest image; nothing else is a duplicate.
        assert by["near_b"].canonical_id == by["b"].id
        assert [k for k, r in by.items() if r and r.canonical_id] == ["near_b"]
        # Identical bytes at two paths: one image, two sources.
        sources = dict(conn.execute(text("SELECT path, image_id FROM image_sources")).all())
        assert len(sources) == 10
        assert sources[str(files["a_copy"])] == sources[str(files["a"])] == by["a"].id
        # Thumbnails: real WebP, longest side 256, aspect kept.
        for data, w, h in conn.execute(text("SELECT data, width, height FROM thumbnails")):
            thumb = Image.open(io.BytesIO(data))
            assert thumb.format == "WEBP" and thumb.size == (w, h) and max(w, h) == 256
        assert conn.execute(text("SELECT count(*) FROM thumbnails")).scalar() == 9
        # Exactly one embedding per image for the model, unit length; the model became the active one.
        emb = conn.execute(
            text(
                "SELECT e.image_id, e.embedding::text FROM embeddings e JOIN embedding_models m"
                " ON m.id = e.model_id WHERE m.name = :n"
            ),
            {"n": TEST_MODEL},
        ).all()
        assert sorted(r[0] for r in emb) == sorted(r.id for r in rows.values())
        assert all(abs(np.linalg.norm(np.array(v.strip("[]").split(","), float)) - 1) < 1e-5 for _, v in emb)
        assert conn.execute(text("SELECT name FROM embedding_models WHERE is_active")).scalar() == TEST_MODEL
        # Mean prototypes per category, over the category's members.
        protos = dict(
            conn.execute(
                text(
                    "SELECT c.name, p.member_count FROM category_prototypes p JOIN categories c ON c.id = p.category_id"
                    " WHERE p.kind = 'mean' AND p.ordinal = 0"
                )
            ).all()
        )
        assert protos == {"cats": 3, "kittens": 1, "dogs": 4, "library": 1}
        mean = conn.execute(
            text(
                "SELECT l2_normalize(avg(e.embedding))::text = p.vector::text FROM embeddings e JOIN categories c"
                " ON c.id = e.category_id JOIN category_prototypes p ON p.category_id = c.id"
                " WHERE c.name = 'dogs' GROUP BY p.vector"
            )
        ).scalar()
        assert mean is True
        failed = conn.execute(text("SELECT path, reason FROM ingest_files WHERE outcome = 'failed'")).all()
        assert failed == [(str(files["broken"]), failed[0][1])] and "not a recognised image" in failed[0][1]

    # Re-run after touching one file (same bytes) and replacing another's content.
    os.utime(files["e"], ns=(1_000_000_000, 1_000_000_000))
    files["d"].write_bytes(make_image(50, (300, 200), "BMP"))
    again = run_index_job(db, embedder, [str(root)], category_from_folder=True, workers=2, batch_size=4)
    assert again.job_id != summary.job_id and not again.resumed
    assert again.run_counts == {"new": 1, "duplicate": 0, "linked": 0, "skipped": 9, "failed": 1}
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images")).scalar() == 9  # old d had no other source
        assert conn.execute(text("SELECT count(*) FROM images WHERE id = :i"), {"i": by["d"].id}).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM embeddings")).scalar() == 9


def test_store_copy_keeps_bytes_and_links_identical(db: Database, embedder: Embedder, scratch: Path) -> None:
    root = scratch / "copy"
    data = make_image(21, (120, 80), "PNG")
    write(root / "x.png", data)
    write(root / "y.png", data)
    summary = run_index_job(db, embedder, [str(root)], category="Things", store="copy", workers=1, batch_size=8)
    assert summary.run_counts["new"] == 1 and summary.run_counts["linked"] == 1
    with db.engine.connect() as conn:
        blob, category = conn.execute(
            text(
                "SELECT b.data, c.name FROM image_blobs b JOIN images i ON i.id = b.image_id"
                " JOIN categories c ON c.id = i.category_id"
            )
        ).one()
        assert bytes(blob) == data and category == "Things"
        # Small images are not enlarged for their thumbnail.
        assert conn.execute(text("SELECT width, height FROM thumbnails")).one() == (120, 80)


def test_cli_index_json_and_jobs(db: Database, scratch: Path) -> None:
    root = scratch / "cli"
    write(root / "one.png", make_image(31, (100, 100)))
    write(root / "bad.jpg", b"")
    env = {"IMSRC_DATABASE_URL": db.url, "IMSRC_DATA_DIR": str(scratch / "data"), "IMSRC_MODEL": TEST_MODEL}
    result = run_cli("index", str(root), "--category", "misc", "--workers", "1", "--json", env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["run_counts"] == {"new": 1, "duplicate": 0, "linked": 0, "skipped": 0, "failed": 1}
    shown = run_cli("jobs", "show", str(out["job_id"]), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "completed" and job["new_count"] == 1
    assert job["failures"] == [
        {"path": str(root / "bad.jpg"), "outcome": "failed", "reason": "empty file (0 bytes)", "image_id": None}
    ]
    listed = json.loads(run_cli("jobs", "--json", env=env).stdout)
    assert [j["id"] for j in listed] == [out["job_id"]]
    missing = run_cli("index", str(scratch / "nope"), env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: path does not exist: {scratch / 'nope'}"]
    unknown = run_cli("jobs", "show", "999", env=env)
    assert unknown.returncode == 1 and "job 999 does not exist" in unknown.stderr


def test_overlapping_paths_visit_each_file_once(db: Database, embedder: Embedder, scratch: Path) -> None:
    root = scratch / "overlap"
    a = write(root / "sub" / "a.png", make_image(41, (50, 50)))
    write(root / "b.png", make_image(42, (50, 50)))
    summary = run_index_job(db, embedder, [str(root), str(root / "sub"), str(a), str(root)], workers=1)
    assert summary.run_counts == {"new": 2, "duplicate": 0, "linked": 0, "skipped": 0, "failed": 0}


def test_cli_duplicates_lists_and_regroups(db: Database, embedder: Embedder, scratch: Path) -> None:
    root = scratch / "dups"
    original = make_image(51, (120, 90), "PNG")
    write(root / "a.png", original)
    write(root / "b.jpg", reencode(original, "JPEG", quality=85))
    write(root / "c.png", make_image(52, (120, 90), "PNG"))
    run_index_job(db, embedder, [str(root)], workers=1)
    env = {"IMSRC_DATABASE_URL": db.url, "IMSRC_DATA_DIR": str(scratch / "data"), "IMSRC_MODEL": TEST_MODEL}
    listed = run_cli("duplicates", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert (data["group_count"], data["duplicate_count"]) == (1, 1)
    [group] = data["groups"]
    assert group["original_name"] == "a.png" and group["duplicates"] == 1 and group["distances"][0] <= 4
    wide = json.loads(run_cli("duplicates", "--recompute", "--threshold", "64", "--json", env=env).stdout)
    assert wide["recomputed"]["changed"] == 1 and wide["duplicate_count"] == 2  # all within 64 bits of a.png
    back = json.loads(run_cli("duplicates", "--recompute", "--json", env=env).stdout)
    assert back["duplicate_count"] == 1 and back["recomputed"]["threshold"] == 4
    misuse = run_cli("duplicates", "--threshold", "3", env=env)
    assert misuse.returncode == 1 and misuse.stderr.strip() == "error: --threshold only applies with --recompute"
