"""Captions and keyword search (issue 19, item 3), on a real catalog (tiny random-init CLIP, real images).

A caption written through each of the four routes (upload form, sidecar at `imsrc index`, `imsrc captions
import`, PATCH /api/images/{id}) is found by keyword search in the API, the CLI and SQL (imsrc.search_text, as
the reader); hybrid search (keywords filter / boost, vectors rank) gives the same ids in the API and in SQL."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from imsrc.api.app import create_app
from imsrc.catalog.captions import CaptionRepository
from imsrc.catalog.readonly_sql import reader_url
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.ingest.service import ingest_bytes
from tests.fixtures.database import database_for
from tests.helpers import make_image, run_cli

MODEL = "open_clip-tiny-test"
CATEGORIES = ("boats", "cats", "maps")


@dataclass
class Catalog:
    url: str
    reader: str
    settings: Settings
    database: Database
    client: TestClient
    ids: dict[str, int]
    folder: Path

    def env(self) -> dict[str, str]:
        return {
            "IMSRC_DATABASE_URL": self.url,
            "IMSRC_DATA_DIR": str(self.settings.data_dir),
            "IMSRC_READER_URL": self.reader,
            "IMSRC_MODEL": MODEL,
        }


@pytest.fixture(scope="module")
def catalog(create_database) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_captions")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-captions-"))
    settings = Settings(
        database_url=url,
        data_dir=folder / "data",
        model=MODEL,
        search_exact_max_rows=4,
        search_backend="pgvector",
        search_two_stage_min_rows=0,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]
    database = database_for(settings)
    embedder = get_embedder(MODEL)
    ids: dict[str, int] = {}
    for c, category in enumerate(CATEGORIES):
        files = [(f"{category}-{i}.png", make_image(300 + 10 * c + i, size=(64 + 8 * c, 48))) for i in range(6)]
        with database.session() as session:
            outcomes = ingest_bytes(session, embedder, files, settings=settings, category=category)
        ids |= {name: int(o.image_id) for (name, _), o in zip(files, outcomes, strict=True) if o.image_id}
    # Every other image has a red sail: the keywords "red sail" keep 9 of 18, across all categories.
    with database.session() as session:
        CaptionRepository(session).set_many(
            [
                (i, "a striped pattern with a red sail" if n % 2 == 0 else "plain blue water, nothing else")
                for n, i in enumerate(sorted(ids.values()))
            ]
        )
    with TestClient(create_app(settings, database=database)) as client:
        yield Catalog(url, reader_url(settings, url), settings, database, client, ids, folder)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


def _reader(catalog: Catalog, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(catalog.reader) as conn:
        conn.read_only = True
        conn.execute("SET imsrc.two_stage_min_rows = 0")
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def _get(catalog: Catalog, path: str, status: int = 200) -> dict[str, Any]:
    resp = catalog.client.get(path)
    assert resp.status_code == status, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _found_everywhere(catalog: Catalog, found: dict[str, tuple[int, str]]) -> None:
    """API and SQL (reader role) keyword search find each image by its word, with its caption; the CLI finds
    them all in one call (one process start, not one per word)."""
    for word, (image_id, caption) in found.items():
        api = _get(catalog, f"/api/search/keywords?q={word}")
        assert api["mode"] == "keywords"
        hit = next(h for h in api["results"] if h["id"] == image_id)
        assert hit["caption"] == caption and hit["keyword_match"] is True
        rows = _reader(catalog, "SELECT image_id, caption FROM imsrc.search_text(%s)", (word,))
        assert (image_id, caption) in rows
    cli = run_cli("search", "keywords", " or ".join(found), "--json", env=catalog.env())
    assert cli.returncode == 0, cli.stderr
    got = {r["id"]: r["caption"] for r in json.loads(cli.stdout)["results"]}
    assert all(got.get(image_id) == caption for image_id, caption in found.values()), got


def test_a_caption_from_each_route_is_found_by_keywords_in_api_cli_and_sql(catalog: Catalog) -> None:
    # 1. the upload form's caption field
    png = make_image(9001, size=(80, 60))
    resp = catalog.client.post(
        "/api/images",
        data={"category": "boats", "caption": "  a lighthouse at dusk "},
        files={"file": ("lighthouse.png", png, "image/png")},
    )
    assert resp.status_code == 200, resp.text
    uploaded = resp.json()["results"][0]["id"]
    # 2. sidecars next to indexed files (.txt, and .json with {"caption": ...}); a broken one is reported
    shelf = catalog.folder / "shelf"
    shelf.mkdir()
    (shelf / "harbour.png").write_bytes(make_image(9002, size=(72, 56)))
    (shelf / "harbour.txt").write_text("Fishing trawlers in the harbour\n")
    (shelf / "kite.png").write_bytes(make_image(9003, size=(72, 56)))
    (shelf / "kite.png.json").write_text(json.dumps({"caption": "a kite over dunes"}))
    (shelf / "bad.png").write_bytes(make_image(9004, size=(72, 56)))
    (shelf / "bad.json").write_text("{not json")
    index = run_cli("index", str(shelf), "--json", env=catalog.env())
    assert index.returncode == 0, index.stderr
    report = json.loads(index.stdout)["captions"]
    assert report["sidecars"] == 2 and report["captions"] == 2
    assert json.loads(index.stdout)["ignored_files"] == 0  # sidecars are read, not "non-image files ignored"
    assert [p["path"] for p in report["problems"]] == [str(shelf / "bad.json")]
    paths = dict(_reader(catalog, "SELECT path, image_id FROM image_sources"))
    harbour, kite = paths[str(shelf / "harbour.png")], paths[str(shelf / "kite.png")]
    # 3. the CSV import (by id, with a comma inside a quoted caption)
    target = catalog.ids["maps-1.png"]
    csv_file = catalog.folder / "captions.csv"
    csv_file.write_text(f'id,caption\n{target},"an old map, hand-drawn, of islands"\n')
    imported = run_cli("captions", "import", str(csv_file), "--json", env=catalog.env())
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"rows": 1, "changed": 1}
    # 4. PATCH /api/images/{id}
    patched = catalog.ids["cats-3.png"]
    resp = catalog.client.patch(f"/api/images/{patched}", json={"caption": "a tabby cat asleep on a windowsill"})
    assert resp.status_code == 200 and resp.json()["caption"] == "a tabby cat asleep on a windowsill"

    _found_everywhere(
        catalog,
        {
            "lighthouse": (uploaded, "a lighthouse at dusk"),
            "trawler": (harbour, "Fishing trawlers in the harbour"),  # stemmed: trawlers
            "dunes": (kite, "a kite over dunes"),
            "islands": (target, "an old map, hand-drawn, of islands"),
            "windowsill": (patched, "a tabby cat asleep on a windowsill"),
        },
    )
    assert _get(catalog, f"/api/images/{patched}")["caption"] == "a tabby cat asleep on a windowsill"

    # An edited sidecar updates the caption on the next index run (the file itself is unchanged).
    (shelf / "harbour.txt").write_text("an empty quay")
    again = run_cli("index", str(shelf), "--json", env=catalog.env())
    assert again.returncode == 0 and json.loads(again.stdout)["captions"]["captions"] == 1
    assert _reader(catalog, "SELECT image_id FROM imsrc.search_text('quay')") == [(harbour,)]
    # PATCH null removes a caption; it is no longer found
    assert catalog.client.patch(f"/api/images/{patched}", json={"caption": None}).json()["caption"] is None
    assert patched not in [h["id"] for h in _get(catalog, "/api/search/keywords?q=windowsill")["results"]]


def test_keywords_alone_rank_the_same_in_api_and_sql(catalog: Catalog) -> None:
    api = _get(catalog, "/api/search/keywords?q=red%20sail&k=20&category=boats&category=maps")
    rows = _reader(
        catalog,
        "SELECT image_id, score, category, rank, keyword_match FROM imsrc.search_text("
        "'red sail', 20, category_ids => (SELECT array_agg(id) FROM categories"
        " WHERE name IN ('boats', 'maps')))",
    )
    assert [r[0] for r in rows] == [h["id"] for h in api["results"]] and len(rows) == 6
    assert {r[2] for r in rows} == {"boats", "maps"} and all(r[4] for r in rows)
    assert [round(r[1], 6) for r in rows] == [h["score"] for h in api["results"]]
    # web-search syntax: a minus excludes
    none = _get(catalog, "/api/search/keywords?q=sail%20-red")["results"]
    assert none == []


@pytest.mark.parametrize("mode", ["two_stage", "exact"])
@pytest.mark.parametrize("keyword_mode", ["filter", "boost"])
def test_hybrid_text_search_matches_sql(catalog: Catalog, mode: str, keyword_mode: str) -> None:
    """Text search with the CLIP model plus keyword matching: the API and imsrc.search_text with the same
    text vector give the same ids, order and match flags."""
    from imsrc.catalog.repository import vector_literal
    from imsrc.search.service import SearchRuntime

    with catalog.database.session() as session:
        service = SearchRuntime.create(catalog.settings).service(session)
        vector = vector_literal(service.embed_text(service.model(None), "a boat on the sea"))
    api = _get(
        catalog,
        f"/api/search/text?q=a%20boat%20on%20the%20sea&k=6&mode={mode}&keywords=red%20sail&keyword_mode={keyword_mode}",
    )
    rows = _reader(
        catalog,
        "SELECT image_id, score, keyword_match FROM imsrc.search_text('red sail', 6, %s::vector, %s, mode => %s)",
        (vector, keyword_mode, mode),
    )
    assert [r[0] for r in rows] == [h["id"] for h in api["results"]] and len(rows) == 6
    assert [r[2] for r in rows] == [h["keyword_match"] for h in api["results"]]
    assert [round(r[1], 6) for r in rows] == pytest.approx([h["score"] for h in api["results"]], abs=1.5e-6)
    assert api["keywords"] == "red sail" and api["keyword_mode"] == keyword_mode
    if keyword_mode == "filter":  # only matching captions, by cosine
        assert all("red sail" in h["caption"] for h in api["results"]) and api["mode"] == "exact"
        assert [h["score"] for h in api["results"]] == sorted((h["score"] for h in api["results"]), reverse=True)
    else:  # boost 1 puts every match first (cosine is at most 1); boost 0 leaves the vector ranking alone
        strong = _get(
            catalog,
            f"/api/search/text?q=a%20boat%20on%20the%20sea&k=6&mode={mode}&keywords=red%20sail"
            "&keyword_mode=boost&boost=1",
        )
        assert all(h["keyword_match"] for h in strong["results"]) and len(strong["results"]) == 6
        if mode == "exact":
            plain = _get(catalog, "/api/search/text?q=a%20boat%20on%20the%20sea&k=6&mode=exact")
            none = _get(
                catalog,
                "/api/search/text?q=a%20boat%20on%20the%20sea&k=6&mode=exact&keywords=red%20sail"
                "&keyword_mode=boost&boost=0",
            )
            assert [h["id"] for h in none["results"]] == [h["id"] for h in plain["results"]]


def test_image_query_with_q_keywords_and_similar_with_keywords(catalog: Catalog) -> None:
    png = make_image(310, size=(72, 48))  # cats-0's picture: a near-duplicate of it comes first without keywords
    resp = catalog.client.post("/api/search/image?q=blue%20water&k=4", files={"file": ("q.png", png, "image/png")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["keywords"] == "blue water" and len(body["results"]) == 4
    assert all("blue water" in h["caption"] and h["keyword_match"] for h in body["results"])
    image = catalog.ids["boats-0.png"]
    similar = _get(catalog, f"/api/search/similar/{image}?k=5&keywords=sail")
    assert image not in [h["id"] for h in similar["results"]]
    assert all("sail" in h["caption"] for h in similar["results"]) and len(similar["results"]) == 5
    cli = run_cli("similar", str(image), "-k", "5", "--keywords", "sail", "--json", env=catalog.env())
    assert cli.returncode == 0, cli.stderr
    assert [h["id"] for h in json.loads(cli.stdout)["results"]] == [h["id"] for h in similar["results"]]


def test_min_score_drops_weaker_results(catalog: Catalog) -> None:
    image = catalog.ids["maps-2.png"]
    full = _get(catalog, f"/api/search/similar/{image}?k=12")["results"]
    cut = sorted(h["score"] for h in full)[6]
    kept = _get(catalog, f"/api/search/similar/{image}?k=12&min_score={cut}")["results"]
    assert [h["id"] for h in kept] == [h["id"] for h in full if h["score"] >= cut] and 0 < len(kept) < 12
    _get(catalog, f"/api/search/similar/{image}?min_score=-2", status=422)
    _get(catalog, f"/api/search/similar/{image}?min_score=nan", status=422)


def test_categories_only_with_sample_images(catalog: Catalog) -> None:
    png = make_image(321, size=(80, 48))
    resp = catalog.client.post("/api/search/categories?samples=2", files={"file": ("q.png", png, "image/png")})
    assert resp.status_code == 200, resp.text
    cats = resp.json()["categories"]
    assert {c["category"] for c in cats} >= set(CATEGORIES)
    assert [c["score"] for c in cats] == sorted((c["score"] for c in cats), reverse=True)
    members = dict(_reader(catalog, "SELECT id, category FROM catalog_images"))
    for c in cats:
        assert 1 <= len(c["sample_thumbnail_urls"]) <= 2
        assert all(members[int(u.split("/")[3])] == c["category"] for u in c["sample_thumbnail_urls"])


def test_bad_captions_and_keywords_are_refused(catalog: Catalog) -> None:
    image = catalog.ids["boats-4.png"]
    before = _get(catalog, f"/api/images/{image}")["caption"]
    for caption, needle in (("x" * 2001, "at most 2000"), ("nul\x00byte", "NUL")):
        resp = catalog.client.patch(f"/api/images/{image}", json={"caption": caption})
        assert resp.status_code == 422 and needle in resp.json()["error"]["message"], resp.text
        resp = catalog.client.post(
            "/api/images", data={"caption": caption}, files={"file": ("new.png", make_image(9100), "image/png")}
        )
        assert resp.status_code == 422 and needle in resp.json()["error"]["message"], resp.text
    assert catalog.client.patch("/api/images/987654321", json={"caption": "x"}).status_code == 404
    assert catalog.client.patch(f"/api/images/{image}", json={}).json()["caption"] == before  # nothing given
    assert catalog.client.patch(f"/api/images/{image}", json={"caption": 5}).status_code == 422
    assert _get(catalog, f"/api/images/{image}")["caption"] == before
    assert not _reader(catalog, "SELECT 1 FROM catalog_images WHERE original_name = 'new.png'")
    for q, status in (("the%20and", 422), ("%20", 422), ("a%00b", 422), ("x" * 1001, 422)):
        resp = catalog.client.get(f"/api/search/keywords?q={q}")
        assert resp.status_code == status and "error" in resp.json(), (q, resp.text)
    assert catalog.client.get(f"/api/search/similar/{image}?keywords=the").status_code == 422
    partial = catalog.client.get(f"/api/search/similar/{image}?keywords=sail&match=partial")
    assert partial.status_code == 422 and "match=partial" in partial.json()["error"]["message"]
    # A CSV with one bad row writes nothing and names the line.
    csv_file = catalog.folder / "bad.csv"
    csv_file.write_text(f"id,caption\n{image},fine\n987654321,no such image\n")
    result = run_cli("captions", "import", str(csv_file), env=catalog.env())
    assert result.returncode != 0 and "line 3: no image with id 987654321" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _get(catalog, f"/api/images/{image}")["caption"] == before


def test_sql_search_text_raises_clear_errors_and_the_reader_cannot_write(catalog: Catalog) -> None:
    cases = [
        ("SELECT * FROM imsrc.search_text('')", "keywords are empty"),
        ("SELECT * FROM imsrc.search_text('the of')", "no searchable words"),
        ("SELECT * FROM imsrc.search_text('sail', 0)", "k must be between 1 and 1000, not 0"),
        ("SELECT * FROM imsrc.search_text('sail', 5, '[1,2,3]'::vector)", "query vector has 3 dimensions"),
        ("SELECT * FROM imsrc.search_text('sail', keyword_mode => 'mix')", "keyword_mode must be filter or boost"),
        ("SELECT * FROM imsrc.search_text('sail', boost => 2)", "boost must be between 0 and 1"),
        (f"SELECT * FROM imsrc.search_text('sail', 5, '{_zero(64)}'::vector, model => 'nope')", "unknown model"),
        (f"SELECT * FROM imsrc.search_text('{'w' * 1001}')", "at most 1000 characters"),
    ]
    for sql, needle in cases:
        with pytest.raises(psycopg.Error, match=needle):
            _reader(catalog, sql)
    with psycopg.connect(catalog.reader, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE images SET caption = 'x'")
    with catalog.database.session() as session, pytest.raises(Exception, match="ck_images_caption_length"):
        session.execute(text("UPDATE images SET caption = repeat('x', 2001)"))


def _zero(n: int) -> str:
    return "[" + ",".join(["0.1"] * n) + "]"


@pytest.mark.parametrize("bad_id", ["²", "1" * 5000, "٣"])
def test_csv_ids_that_are_not_ascii_digits_name_their_line(tmp_path: Path, bad_id: str) -> None:
    """str.isdigit() is true for '²' (int() then fails) and for other scripts' digits; 5,000 digits exceed
    Python's int conversion limit. Each is a one-line error for its row, checked before the database is read."""
    from imsrc.errors import InvalidInputError
    from imsrc.ingest.captions import import_csv

    csv_file = tmp_path / "ids.csv"
    csv_file.write_text(f"id,caption\n1,fine\n{bad_id},odd id\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="line 3: id must be a positive integer"):
        import_csv(None, csv_file)  # type: ignore[arg-type]  # the rows are refused before the session is used


def test_csv_ids_with_leading_zeros_name_the_same_image() -> None:
    """'007' is image 7: the looked-up ids are keyed by str(int), so the raw '007' was 'no image with id 007'."""
    from imsrc.ingest.captions import _entries

    rows: list[dict[str | None, str | None]] = [{"id": "007", "caption": "seven"}, {"id": " 12 ", "caption": None}]
    assert [(line, value) for line, value, _ in _entries(rows, "id")] == [(2, "7"), (3, "12")]
