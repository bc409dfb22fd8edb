"""The SQL catalog for people: the views, every example query in db/queries, and `imsrc sql`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.readonly_sql import reader_url, run_readonly
from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.config import Settings
from imsrc.errors import InvalidInputError
from tests.helpers import run_cli

QUERIES = sorted((Path(__file__).resolve().parents[1] / "db" / "queries").glob("*.sql"))


@pytest.fixture()
def catalog(session: Session) -> dict[str, int]:
    """Three images in two categories, one a duplicate of another, embedded by the active model."""
    cats = CategoryRepository(session)
    shoes, bags = cats.get_or_create("shoes"), cats.get_or_create("bags")
    models = ModelRepository(session)
    model = models.register(name="sqltest", dimension=3, family="t", params={}, supports_text=False)
    models.set_active(model)
    ids = {}
    rows = [("a.png", shoes.id, [1, 0, 0]), ("b.png", shoes.id, [0.9, 0.1, 0]), ("c.png", bags.id, [0, 0, 1])]
    for n, (name, cat, vec) in enumerate(rows):
        ids[name] = session.execute(
            text(
                "INSERT INTO images (sha256, width, height, format, byte_size, original_name, category_id)"
                " VALUES (:s, 4, 3, 'PNG', 100, :n, :c) RETURNING id"
            ),
            {"s": (n + 100).to_bytes(32, "big"), "n": name, "c": cat},
        ).scalar_one()
        v = np.array(vec, dtype=float)
        session.execute(
            text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, :e)"),
            {"m": model.id, "i": ids[name], "e": str((v / np.linalg.norm(v)).tolist())},
        )
    # d.png: a duplicate of a.png with no embedding yet.
    ids["d.png"] = session.execute(
        text(
            "INSERT INTO images (sha256, width, height, format, byte_size, original_name, category_id,"
            " canonical_id) VALUES (:s, 4, 3, 'PNG', 100, 'd.png', :c, :k) RETURNING id"
        ),
        {"s": (999).to_bytes(32, "big"), "c": shoes.id, "k": ids["a.png"]},
    ).scalar_one()
    # Mean prototypes (stage 1 of search) for both categories.
    for cat, vec in [(shoes.id, "[1,0,0]"), (bags.id, "[0,0,1]")]:
        session.execute(
            text(
                "INSERT INTO category_prototypes (category_id, model_id, kind, vector, member_count)"
                " VALUES (:c, :m, 'mean', CAST(:v AS vector), 2)"
            ),
            {"c": cat, "m": model.id, "v": vec},
        )
    session.execute(text("SET LOCAL ROLE imsrc_reader"))  # run the queries with the reader's rights
    return ids


def _run(session: Session, path: Path) -> list[dict[str, object]]:
    return [dict(r._mapping) for r in session.execute(text(path.read_text()))]


def test_every_example_query_is_covered() -> None:
    # 06: tests/test_ingest_upload.py
    assert [p.name[:2] for p in QUERIES] == ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]


def test_images_per_category(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[0])
    assert [(r["category"], r["image_count"], r["unique_image_count"]) for r in rows] == [
        ("shoes", 3, 2),
        ("bags", 1, 1),
    ]


def test_missing_embeddings(session: Session, catalog: dict[str, int]) -> None:
    assert [r["id"] for r in _run(session, QUERIES[1])] == [catalog["d.png"]]


def test_nearest_neighbours(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[2])
    assert [r["original_name"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[0]["cosine_distance"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["cosine_distance"] == pytest.approx(1.0, abs=1e-6)


def test_duplicate_groups(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[3])
    assert rows == [
        {"canonical_id": catalog["a.png"], "original_name": "a.png", "duplicate_ids": [catalog["d.png"]], "copies": 1}
    ]


def test_models_query(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[4])
    assert rows[0]["name"] == "sqltest" and rows[0]["embedded_images"] == 3 and rows[0]["images"] == 4


def test_two_stage_search_query(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[6])
    # a.png itself is left out; d.png (its duplicate) has no vector; b.png is close, c.png far.
    assert [(r["rank"], r["original_name"], r["category"]) for r in rows] == [
        (1, "b.png", "shoes"),
        (2, "c.png", "bags"),
    ]
    assert float(rows[0]["score"]) == pytest.approx(0.9939, abs=1e-4)


def test_categories_for_image_query(session: Session, catalog: dict[str, int]) -> None:
    rows = _run(session, QUERIES[7])
    assert [(r["rank"], r["category"], float(r["score"]), r["prototypes"]) for r in rows] == [
        (1, "shoes", 1.0, 1),
        (2, "bags", 0.0, 1),
    ]


def _captions(session: Session, catalog: dict[str, int]) -> None:
    session.execute(text("RESET ROLE"))
    for name, caption in (
        ("a.png", "red shoes, worn"),
        ("b.png", "a blue shoe"),
        ("c.png", "a red handbag"),
        ("d.png", "red shoes again"),
    ):
        session.execute(text("UPDATE images SET caption = :c WHERE id = :i"), {"c": caption, "i": catalog[name]})
    session.execute(text("SET LOCAL ROLE imsrc_reader"))


def test_keyword_search_query(session: Session, catalog: dict[str, int]) -> None:
    _captions(session, catalog)
    rows = _run(session, QUERIES[8])
    # both words in a.png's caption (stemmed); d.png is a hidden duplicate; b.png and c.png lack one word
    assert [(r["rank"], r["original_name"], r["caption"]) for r in rows] == [(1, "a.png", "red shoes, worn")]


def test_hybrid_keyword_search_query(session: Session, catalog: dict[str, int]) -> None:
    _captions(session, catalog)
    rows = _run(session, QUERIES[9])
    # 'shoe' matches a.png and b.png (c.png is a handbag); ranked by the vector of a.png, the first embedded
    assert [(r["rank"], r["original_name"], r["keyword_match"]) for r in rows] == [
        (1, "a.png", True),
        (2, "b.png", True),
    ]
    assert float(rows[1]["score"]) == pytest.approx(0.9939, abs=1e-4)


def test_catalog_images_view_columns(session: Session, catalog: dict[str, int]) -> None:
    row = session.execute(text("SELECT * FROM catalog_images WHERE id = :i"), {"i": catalog["a.png"]}).one()
    assert row.category == "shoes" and row.width == 4 and row.height == 3 and row.byte_size == 100
    assert row.duplicate_count == 1 and row.is_duplicate is False and row.embedded_models == ["sqltest"]


def test_reader_cannot_write(session: Session, catalog: dict[str, int]) -> None:
    from sqlalchemy.exc import ProgrammingError

    with pytest.raises(ProgrammingError, match="permission denied"), session.begin_nested():
        session.execute(text("DELETE FROM images"))


def test_run_readonly_as_reader(settings: Settings, database_url: str) -> None:
    url = reader_url(settings, database_url)
    result = run_readonly(url, "SELECT current_user AS who, 1 + 1 AS two")
    assert result.columns == ["who", "two"] and result.rows == [("imsrc_reader", 2)]
    for bad, needle in [
        ("INSERT INTO categories (name) VALUES ('x')", "read-only"),
        ("SELECT 1; DROP TABLE images", "exactly one statement"),
        ("SET ROLE postgres", "may only read the catalog"),
        ("VACUUM", "cannot run inside a transaction"),
        ("SELECT * FROM pg_authid", "may only read the catalog"),
        ("SELECT pg_read_file('/etc/passwd')", "may only read the catalog"),
        ("", "empty query"),
    ]:
        with pytest.raises(InvalidInputError, match=needle):
            run_readonly(url, bad)


def test_cli_sql_json_csv_and_refusal(scratch: Path, database_url: str) -> None:
    env = {"IMSRC_DATABASE_URL": database_url, "IMSRC_DATA_DIR": str(scratch)}
    result = run_cli("sql", "select count(*) as n from catalog_images", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"n": 0}]
    csv_out = run_cli("sql", "select 1 as a, 'x' as b", "--csv", env=env)
    assert csv_out.stdout.splitlines() == ["a,b", "1,x"]
    refused = run_cli("sql", "INSERT INTO categories (name) VALUES ('nope')", env=env)
    assert refused.returncode == 1 and "read-only" in refused.stderr and "Traceback" not in refused.stderr
