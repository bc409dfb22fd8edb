"""Backup and restore: a dump restored into an empty data directory holds the same catalog."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from imsrc.db.engine import upgrade
from tests.helpers import make_image, run_cli

TABLES = {
    "categories": "SELECT id, name, is_automatic FROM categories ORDER BY id",
    "images": "SELECT id, encode(sha256, 'hex'), phash::text, width, height, category_id, canonical_id FROM images"
    " ORDER BY id",
    "image_blobs": "SELECT image_id, md5(data) FROM image_blobs ORDER BY image_id",
    "thumbnails": "SELECT image_id, md5(data) FROM thumbnails ORDER BY image_id",
    "embeddings": "SELECT model_id, image_id, category_id, embedding::text FROM embeddings ORDER BY 1, 2",
    "prototypes": "SELECT category_id, model_id, kind, ordinal, vector::text, member_count FROM category_prototypes"
    " ORDER BY 1, 2, 3, 4",
    "models": "SELECT id, name, dimension, is_active FROM embedding_models ORDER BY id",
    "category_vectors": "SELECT model_id, image_id, category_id, embedding::text FROM category_vectors ORDER BY 1, 2",
}


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(_libpq(url)) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in TABLES.items()}  # type: ignore[arg-type]


def _fill(url: str) -> None:
    with psycopg.connect(_libpq(url)) as conn:
        conn.execute("INSERT INTO categories (name) VALUES ('cats'), ('dogs')")
        conn.execute("INSERT INTO embedding_models (name, dimension, family, is_active) VALUES ('m', 3, 't', true)")
        conn.execute(
            "CREATE INDEX ix_embeddings_hnsw_m1 ON embeddings USING hnsw ((embedding::vector(3))"
            " vector_cosine_ops) WHERE model_id = 1"
        )
        for i in range(1, 4):
            data = make_image(i)
            conn.execute(
                "INSERT INTO images (sha256, phash, width, height, format, byte_size, category_id, canonical_id)"
                " VALUES (sha256(%s), B'1010000000000000000000000000000000000000000000000000000000000001', 96, 64,"
                " 'PNG', %s, %s, %s)",
                (data, len(data), 1 + i % 2, 1 if i == 3 else None),
            )
            conn.execute("INSERT INTO image_blobs VALUES (%s, %s)", (i, data))
            conn.execute("INSERT INTO thumbnails (image_id, data, width, height) VALUES (%s, %s, 9, 6)", (i, data[:50]))
            conn.execute(
                "INSERT INTO embeddings (model_id, image_id, embedding) VALUES (1, %s, %s)", (i, f"[{i},0.5,0.25]")
            )
        conn.execute(
            "INSERT INTO category_prototypes (category_id, model_id, vector, member_count)"
            " VALUES (1, 1, '[1,0,0]', 1), (2, 1, '[0,1,0]', 2)"
        )
        # A per-category index on its partition of category_vectors, as search sync builds it.
        conn.execute("SELECT imsrc._create_category_partition(2)")
        conn.execute(
            "CREATE INDEX ix_embeddings_hv_m1_c2 ON category_vectors_c2 USING hnsw ((embedding::halfvec(3))"
            " halfvec_ip_ops) WHERE model_id = 1"
        )


def test_backup_restore_into_empty_data_directory(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    source = create_database("imsrc_backup_src")
    upgrade(source)
    _fill(source)
    dump = scratch / "catalog.imsrc"
    out = run_cli("backup", str(dump), "--json", env={"IMSRC_DATABASE_URL": source})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["images"] == 3 and summary["stored_originals"] == 3 and dump.stat().st_size == summary["bytes"]

    # An empty data directory: the restore starts a new embedded server there.
    env = {"IMSRC_DATA_DIR": str(scratch / "restored")}
    restored = run_cli("restore", str(dump), env=env)
    assert restored.returncode == 0, restored.stderr
    url = run_cli("db", "url", env=env).stdout.strip()
    assert _snapshot(url) == _snapshot(source)
    # The per-model HNSW index and the reader role's rights come back too.
    rows = run_cli("sql", "SELECT count(*) AS n FROM catalog_embeddings", "--json", env=env)
    assert json.loads(rows.stdout) == [{"n": 3}]
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_embeddings_hnsw_m1'").fetchone()
        assert found == (1,)
        # the per-category index on its partition, whose rows came back once (not again through the trigger)
        part = conn.execute("SELECT tablename FROM pg_indexes WHERE indexname = 'ix_embeddings_hv_m1_c2'").fetchone()
        assert part == ("category_vectors_c2",)
    assert len(_snapshot(url)["category_vectors"]) == 2

    # A second restore over a catalog that holds images is refused without --force, and leaves it intact.
    again = run_cli("restore", str(dump), env=env)
    assert again.returncode == 1 and "--force" in again.stderr
    assert run_cli("restore", str(dump), "--force", env=env).returncode == 0
    assert _snapshot(url) == _snapshot(source)


def test_restore_rejects_a_file_that_is_not_a_backup(scratch: Path) -> None:
    bogus = scratch / "not-a-backup.dump"
    bogus.write_bytes(b"hello")
    result = run_cli("restore", str(bogus), env={"IMSRC_DATA_DIR": str(scratch / "d")})
    assert result.returncode == 1 and "not an imsrc backup" in result.stderr and "Traceback" not in result.stderr


def _results(out: str) -> list[tuple[int, float, str | None]]:
    body = json.loads(out)
    return [(r["id"], round(r["score"], 5), r["category"]) for r in body["results"]]


def test_restored_catalog_searches_the_same(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    """Index real images with the tiny CLIP, back up, restore into an empty data directory: the same images,
    vectors, categories and prototypes, and search answers the same."""
    from tests.helpers import make_image

    photos = scratch / "photos"
    for i in range(24):
        folder = photos / ["sky", "sea", "sand"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"p{i}.png").write_bytes(make_image(700 + i, size=(64, 48)))
    source = create_database("imsrc_backup_search")
    src_env = {
        "IMSRC_DATABASE_URL": source,
        "IMSRC_DATA_DIR": str(scratch / "src"),
        "IMSRC_MODEL": "open_clip-tiny-test",
    }
    assert run_cli("index", str(photos), "--category-from-folder", "--store", "copy", env=src_env).returncode == 0
    dump = scratch / "search.imsrc"
    assert run_cli("backup", str(dump), env=src_env).returncode == 0

    dst_env = {"IMSRC_DATA_DIR": str(scratch / "restored"), "IMSRC_MODEL": "open_clip-tiny-test"}
    assert run_cli("restore", str(dump), env=dst_env).returncode == 0, "restore failed"
    dst_url = run_cli("db", "url", env=dst_env).stdout.strip()
    assert _snapshot(dst_url) == _snapshot(source)

    query = photos / "sea" / "p1.png"
    for args in (
        ("similar", "3", "-k", "8"),
        ("search", "image", str(query), "-k", "8"),
        ("search", "image", str(query), "-k", "8", "--exact"),
        ("search", "text", "sea", "-k", "5"),
    ):
        before = run_cli(*args, "--json", env=src_env)
        after = run_cli(*args, "--json", env=dst_env)
        assert before.returncode == after.returncode == 0, (args, before.stderr, after.stderr)
        assert _results(before.stdout) == _results(after.stdout), args
        assert len(_results(after.stdout)) > 0
