"""The search functions in SQL (schema imsrc, migration 0005) against the API's pgvector path, on a real
catalog: real images indexed through the ingest code with the tiny random-init CLIP, per-category indexes built."""

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
from imsrc.catalog.readonly_sql import reader_url, run_readonly
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.errors import InvalidInputError
from imsrc.ingest.service import ingest_bytes
from tests.fixtures.database import database_for
from tests.helpers import make_image, run_cli

MODEL = "open_clip-tiny-test"
CATEGORIES = ("boats", "cats", "maps", "toys")
MODES = ("two_stage", "ann", "exact")


@dataclass
class Catalog:
    url: str
    reader: str
    settings: Settings
    database: Database
    ids: dict[str, int]
    duplicates: list[int]


@pytest.fixture(scope="module")
def catalog(create_database) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_sql_search")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-sql-search-"))
    # search_exact_max_rows 4: every 8-image category gets its own HNSW index, so the index branches run.
    settings = Settings(
        database_url=url,
        data_dir=folder / "data",
        model=MODEL,
        search_exact_max_rows=4,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]
    database = database_for(settings)
    embedder = get_embedder(MODEL)
    ids: dict[str, int] = {}
    for c, category in enumerate(CATEGORIES):
        files = [(f"{category}-{i}.png", make_image(100 * c + i, size=(64 + 8 * c, 48))) for i in range(8)]
        with database.session() as session:
            outcomes = ingest_bytes(session, embedder, files, settings=settings, category=category)
        for (name, _), outcome in zip(files, outcomes, strict=True):
            assert outcome.image_id is not None
            ids[name] = int(outcome.image_id)
    # Two images marked as near-duplicates of cats-0: hidden from results unless asked for.
    duplicates = [ids["cats-1.png"], ids["boats-2.png"]]
    with database.session() as session:
        session.execute(
            text("UPDATE images SET canonical_id = :c WHERE id = ANY(:d)"), {"c": ids["cats-0.png"], "d": duplicates}
        )
        # maps-6 gets the pHash of cats-4 with one bit flipped: a near-duplicate by pHash in another category,
        # which `similar` must list first whatever stage 1 picks (service._duplicates_first).
        session.execute(
            text(
                "UPDATE images SET phash = (SELECT phash # ('1' || repeat('0', 63))::bit(64)"
                " FROM images WHERE id = :a) WHERE id = :b"
            ),
            {"a": ids["cats-4.png"], "b": ids["maps-6.png"]},
        )
        session.commit()
    yield Catalog(url, reader_url(settings, url), settings, database, ids, duplicates)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


def _api(catalog: Catalog, path: str, **update: Any) -> dict[str, Any]:
    settings = catalog.settings.model_copy(update={"search_backend": "pgvector", **update})
    with TestClient(create_app(settings, database=catalog.database)) as client:
        resp = client.get(path)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _reader(catalog: Catalog, sql: str, params: tuple[Any, ...] = (), **gucs: str) -> list[tuple[Any, ...]]:
    """Run as imsrc_reader, with optional imsrc.* settings for the session."""
    with psycopg.connect(catalog.reader) as conn:
        conn.read_only = True
        for name, value in gucs.items():
            conn.execute(f"SET imsrc.{name} = {int(value)}")
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def test_the_catalog_has_per_category_indexes_and_prototypes(catalog: Catalog) -> None:
    rows = _reader(
        catalog, "SELECT category, index_rows, index_expression FROM catalog_category_indexes ORDER BY category"
    )
    assert [r[0] for r in rows] == list(CATEGORIES)
    assert all(r[1] >= 6 and r[2].startswith("(embedding::halfvec(") for r in rows)
    protos = _reader(
        catalog,
        "SELECT category, model, kind, member_count, vector_dims(vector)"
        " FROM catalog_prototypes WHERE kind = 'mean' ORDER BY category",
    )
    assert [p[0] for p in protos] == list(CATEGORIES) and all(p[1] == MODEL and p[3] >= 7 for p in protos)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("categories", [None, 1, 2])
def test_similar_matches_the_api_two_stage_path(catalog: Catalog, mode: str, categories: int | None) -> None:
    """Every mode, with the small-catalog rule off on both sides, so stage 1, the per-category branches, the
    duplicate margin and the fill from the next categories all run. The stage-1 fallback is off too: the tiny
    random model's categories overlap, so it would answer these as `ann` (covered by the test below)."""
    fan = "" if categories is None else f"&categories={categories}"
    for name in ("cats-0.png", "maps-3.png", "toys-7.png", "cats-4.png"):
        image = catalog.ids[name]
        api = _api(
            catalog,
            f"/api/search/similar/{image}?k=10&mode={mode}{fan}",
            search_two_stage_min_rows=0,
            search_stage1_fallback=False,
        )
        assert api["mode"] == mode
        rows = _reader(
            catalog,
            "SELECT image_id, score, category, rank FROM imsrc.similar(%s, 10, %s, %s)",
            (image, categories, mode),
            two_stage_min_rows="0",
            stage1_fallback="0",
        )
        assert [r[0] for r in rows] == [h["id"] for h in api["results"]]
        assert [r[2] for r in rows] == [h["category"] for h in api["results"]]
        assert [r[3] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 10
        # The same scores on both sides (the API's per-category re-sort once used a half-precision query where the
        # SQL used a full-precision one: 1.4e-5 apart, near-ties in another order).
        assert [round(r[1], 6) for r in rows] == pytest.approx([h["score"] for h in api["results"]], abs=1.5e-6)
        truth = dict(
            _reader(
                catalog,
                "SELECT b.image_id, 1 - (b.embedding <=> a.embedding) FROM embeddings a"
                " JOIN embeddings b USING (model_id) WHERE a.image_id = %s",
                (image,),
            )
        )
        # A walked category is scored from its partition's half-precision copy (pg_queries._union); `ann` and
        # `exact` score the full-precision row.
        tolerance = 5e-5 if mode == "two_stage" else 1.5e-6
        assert [h["score"] for h in api["results"]] == pytest.approx([truth[r[0]] for r in rows], abs=tolerance)
        assert not set(catalog.duplicates) & {r[0] for r in rows}
        if name == "cats-4.png":
            assert rows[0][0] == catalog.ids["maps-6.png"] and api["results"][0]["match_type"] == "duplicate"


@pytest.mark.parametrize("mode", MODES)
def test_search_in_categories_matches_the_api(catalog: Catalog, mode: str) -> None:
    image = catalog.ids["boats-1.png"]
    vector = _reader(catalog, "SELECT embedding::text FROM embeddings WHERE image_id = %s", (image,))[0][0]
    cats = dict(_reader(catalog, "SELECT name, id FROM categories"))
    api = _api(catalog, f"/api/search/similar/{image}?k=12&mode={mode}&category=maps&category=cats")
    rows = _reader(
        catalog, "SELECT image_id FROM imsrc.similar_in(%s, %s, 12, %s)", (image, [cats["maps"], cats["cats"]], mode)
    )
    assert [r[0] for r in rows] == [h["id"] for h in api["results"]]
    searched = _reader(
        catalog,
        "SELECT image_id, category FROM imsrc.search_in(%s::vector, %s::int[], 5, %s)",
        (vector, [cats["maps"]], mode),
    )
    assert len(searched) == 5 and {r[1] for r in searched} == {"maps"}


def test_search_with_a_vector_includes_the_image_and_duplicates_on_request(catalog: Catalog) -> None:
    image = catalog.ids["cats-0.png"]
    vector = _reader(catalog, "SELECT embedding::text FROM embeddings WHERE image_id = %s", (image,))[0][0]
    rows = _reader(catalog, "SELECT image_id, score FROM imsrc.search(%s::vector, 5)", (vector,))
    assert rows[0][0] == image and rows[0][1] == pytest.approx(1.0, abs=1e-5)
    with_dups = _reader(
        catalog, "SELECT image_id FROM imsrc.search(%s::vector, 30, include_duplicates => true)", (vector,)
    )
    assert set(catalog.duplicates) <= {r[0] for r in with_dups}


def test_default_similar_through_imsrc_sql_equals_the_api(catalog: Catalog) -> None:
    """The README's example, as shipped: default settings on both sides (a small catalog answers two_stage
    as ann, IMSRC_SEARCH_TWO_STAGE_MIN_ROWS / imsrc.two_stage_min_rows), through `imsrc sql` as the reader."""
    image = catalog.ids["maps-0.png"]
    api = _api(catalog, f"/api/search/similar/{image}?k=10")
    assert api["mode"] == "ann"
    env = {
        "IMSRC_DATABASE_URL": catalog.url,
        "IMSRC_DATA_DIR": str(catalog.settings.data_dir),
        "IMSRC_READER_URL": catalog.reader,
    }
    result = run_cli("sql", f"select * from imsrc.similar({image}, 10)", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["image_id"] for r in rows] == [h["id"] for h in api["results"]]
    assert [r["rank"] for r in rows] == list(range(1, 11))


def test_stage1_functions_match_the_api_categories(catalog: Catalog) -> None:
    image = catalog.ids["toys-2.png"]
    # The fallback off: the tiny random model's overlapping categories would have stage 1 pick none.
    api = _api(
        catalog,
        f"/api/search/similar/{image}?k=10&mode=two_stage",
        search_two_stage_min_rows=0,
        search_stage1_fallback=False,
    )
    vector = _reader(catalog, "SELECT embedding::text FROM embeddings WHERE image_id = %s", (image,))[0][0]
    picked = _reader(catalog, "SELECT category FROM imsrc.stage1(%s::vector)", (vector,), stage1_fallback="0")
    assert picked
    ranked = _reader(catalog, "SELECT category, score, rank FROM imsrc.categories_for(%s::vector, 10)", (vector,))
    assert len(ranked) == len(CATEGORIES) and [r[2] for r in ranked] == [1, 2, 3, 4]
    assert [r[1] for r in ranked] == sorted((r[1] for r in ranked), reverse=True)
    # The API reports what it searched: the stage-1 picks, then any categories the fill added.
    reported = [c["category"] for c in api["stage1"]]
    assert reported[: len(picked)] == [p[0] for p in picked]
    assert reported == [r[0] for r in ranked][: len(reported)]
    top2 = _reader(catalog, "SELECT category FROM imsrc.categories_for(%s::vector, 2)", (vector,))
    assert [t[0] for t in top2] == [r[0] for r in ranked[:2]]


@pytest.mark.parametrize(
    ("temperature", "fallback", "most", "expected", "mode"),
    [
        (0.0005, True, 0, 1, "two_stage"),
        (5.0, True, 0, 0, "ann"),
        (5.0, True, 6, 4, "two_stage"),
        (5.0, True, 3, 0, "ann"),
        (5.0, False, 6, 3, "two_stage"),
    ],
)
def test_stage1_follows_the_models_calibrated_temperature(
    catalog: Catalog, temperature: float, fallback: bool, most: int, expected: int, mode: str
) -> None:
    """Sync stored a calibrated temperature (search_state stage1:m<id>); the API and imsrc.stage1/similar both
    pick by it: a tiny one searches one category. A huge one spreads the score mass over all 4 categories, more
    than the cap (3): with the fallback (default) stage 1 is not sure, picks nothing and the whole model is
    searched (mode ann), on both sides, or, with IMSRC_SEARCH_FALLBACK_CATEGORIES (imsrc.fallback_categories) 6,
    the 4 categories its rule wants (not with 3); without it (IMSRC_SEARCH_STAGE1_FALLBACK=false,
    imsrc.stage1_fallback 0) the cap cuts the rule at 3 categories, as before."""
    with catalog.database.session() as session:
        key, saved = session.execute(text("SELECT key, value FROM search_state WHERE key LIKE 'stage1:m%'")).one()
        assert saved["temperature"] > 0 and saved["samples"] == 32 and saved["categories"] == len(CATEGORIES)
        assert saved["fallback"] is True and 0.0 <= saved["over_cap"] <= 1.0
        session.execute(
            text(
                "UPDATE search_state SET value = jsonb_set(value, '{temperature}', to_jsonb(CAST(:t AS"
                " float8))), updated_at = clock_timestamp() WHERE key = :k"
            ),
            {"t": temperature, "k": key},
        )
        session.commit()
    gucs = ({} if fallback else {"stage1_fallback": "0"}) | ({"fallback_categories": str(most)} if most else {})
    try:
        image = catalog.ids["toys-2.png"]
        api = _api(
            catalog,
            f"/api/search/similar/{image}?k=10&mode=two_stage",
            search_two_stage_min_rows=0,
            search_stage1_fallback=fallback,
            search_fallback_categories=most,
        )
        assert api["mode"] == mode
        vector = _reader(catalog, "SELECT embedding::text FROM embeddings WHERE image_id = %s", (image,))[0][0]
        picked = [p[0] for p in _reader(catalog, "SELECT category FROM imsrc.stage1(%s::vector)", (vector,), **gucs)]
        assert len(picked) == expected and [c["category"] for c in api["stage1"]][:expected] == picked
        rows = _reader(catalog, "SELECT image_id FROM imsrc.similar(%s, 10)", (image,), two_stage_min_rows="0", **gucs)
        assert [r[0] for r in rows] == [h["id"] for h in api["results"]]
        if mode == "ann":  # nothing picked, the same results as asking for ann
            assert api["stage1"] == []
            ann = _api(catalog, f"/api/search/similar/{image}?k=10&mode=ann")
            assert [h["id"] for h in ann["results"]] == [h["id"] for h in api["results"]]
    finally:
        with catalog.database.session() as session:
            session.execute(
                text(
                    "UPDATE search_state SET value = CAST(:v AS jsonb), updated_at = clock_timestamp() WHERE key = :k"
                ),
                {"v": json.dumps(saved), "k": key},
            )
            session.commit()


def test_another_model_by_name_and_bad_input_raise_clear_errors(catalog: Catalog) -> None:
    image = catalog.ids["cats-2.png"]
    by_name = _reader(catalog, "SELECT image_id FROM imsrc.similar(%s, 3, model => %s)", (image, MODEL))
    assert len(by_name) == 3
    cases = [
        ("SELECT * FROM imsrc.search('[1,2,3]'::vector)", "query vector has 3 dimensions"),
        (f"SELECT * FROM imsrc.similar({image}, 10, model => 'no-such-model')", "unknown model 'no-such-model'"),
        (f"SELECT * FROM imsrc.similar({image}, 0)", "k must be between 1 and 1000, not 0"),
        (f"SELECT * FROM imsrc.similar({image}, 1001)", "k must be between 1 and 1000, not 1001"),
        ("SELECT * FROM imsrc.similar(987654321, 10)", "image 987654321 does not exist"),
        (f"SELECT * FROM imsrc.similar({image}, 10, mode => 'fast')", "mode must be two_stage, ann or exact"),
        (f"SELECT * FROM imsrc.similar_in({image}, ARRAY[987654321])", "no category with id 987654321"),
        ("SELECT * FROM imsrc.categories_for('[1,2]'::vector, 5)", "query vector has 2 dimensions"),
    ]
    for sql, needle in cases:
        with pytest.raises(psycopg.Error, match=needle):
            _reader(catalog, sql)


def test_reader_can_search_but_still_cannot_write(catalog: Catalog) -> None:
    image = catalog.ids["boats-0.png"]
    result = run_readonly(catalog.reader, f"SELECT image_id FROM imsrc.similar({image}, 4)")
    assert len(result.rows) == 4
    with pytest.raises(InvalidInputError, match=r"read-only|may only read"):
        run_readonly(catalog.reader, "DELETE FROM images")
    with pytest.raises(InvalidInputError, match=r"read-only|may only read"):
        run_readonly(catalog.reader, "CREATE FUNCTION imsrc.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    with psycopg.connect(catalog.reader, autocommit=True) as conn:  # even outside a read-only transaction
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE images SET original_name = 'x'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "CREATE OR REPLACE FUNCTION imsrc._setting(name text, fallback numeric) RETURNS numeric"
                " LANGUAGE sql AS 'SELECT 1'"
            )


def test_the_readme_recipe_for_a_hand_written_query_uses_the_category_index(catalog: Catalog) -> None:
    """db/README.md: the partial index is used when the query repeats its predicate and ORDER BY."""
    model_id, category_id, index_name, predicate, order_by, dimension = _reader(
        catalog,
        "SELECT x.model_id, x.category_id, x.index_name, x.index_predicate, x.order_by, m.dimension"
        " FROM catalog_category_indexes x JOIN catalog_models m ON m.id = x.model_id"
        " WHERE x.category = 'maps'",
    )[0]
    assert predicate == f"WHERE model_id = {model_id} AND category_id = {category_id}"
    vector = _reader(
        catalog, "SELECT embedding::text FROM embeddings WHERE image_id = %s", (catalog.ids["maps-5.png"],)
    )[0][0]
    q = f"'{vector}'::vector"
    # The walk on the category's partition of category_vectors, the re-sort on embeddings' full vectors.
    inner = f"SELECT image_id FROM category_vectors {predicate} {order_by.replace('CAST(q AS', f'CAST({q} AS')} LIMIT 5"
    sql = (
        f"SELECT image_id, 1 - (e.embedding <=> {q}) AS score FROM ({inner}) s JOIN embeddings e USING (image_id)"
        f" WHERE e.model_id = {model_id} ORDER BY score DESC LIMIT 5"
    )
    assert f"halfvec({dimension})" in sql
    with psycopg.connect(catalog.reader) as conn:
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {sql}").fetchall())
        assert f"Index Scan using {index_name}" in plan
        hand = [r[0] for r in conn.execute(sql).fetchall()]
    exact = _reader(
        catalog,
        "SELECT image_id FROM imsrc.search_in(%s::vector, %s, 5, 'exact', include_duplicates => true)",
        (vector, [category_id]),
    )
    assert hand == [r[0] for r in exact] and hand[0] == catalog.ids["maps-5.png"]


@pytest.mark.parametrize("mode", MODES)
def test_search_with_a_query_image_vector_matches_the_api(catalog: Catalog, mode: str) -> None:
    """imsrc.search with the vector the service computes for an uploaded image (not in the catalog)."""
    from imsrc.catalog.repository import vector_literal
    from imsrc.search.service import SearchRuntime

    png = make_image(4242, size=(70, 48))
    settings = catalog.settings.model_copy(update={"search_backend": "pgvector", "search_two_stage_min_rows": 0})
    with catalog.database.session() as session:
        service = SearchRuntime.create(settings).service(session)
        vector = vector_literal(service.embed_image(service.model(None), png))
    with TestClient(create_app(settings, database=catalog.database)) as client:
        resp = client.post(f"/api/search/image?k=10&mode={mode}", files={"file": ("q.png", png, "image/png")})
    assert resp.status_code == 200, resp.text
    api = resp.json()
    rows = _reader(
        catalog,
        "SELECT image_id, score FROM imsrc.search(%s::vector, 10, NULL, %s)",
        (vector, mode),
        two_stage_min_rows="0",
    )
    assert [r[0] for r in rows] == [h["id"] for h in api["results"]] and len(rows) == 10
    assert [round(r[1], 6) for r in rows] == pytest.approx([h["score"] for h in api["results"]], abs=1.5e-6)
