"""Near-duplicates first (issue 18, item 1): a recompressed, half-size copy of an indexed photo is rank 1 and
marked `duplicate` in every mode and backend, even when stage 1 routes the query to another category; the
pHash look-up goes through the band indexes and finds exactly what a brute-force Hamming scan finds."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from skimage import data as samples
from sqlalchemy import text

from imsrc.api.app import create_app
from imsrc.catalog.repository import vector_literal
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import get_embedder
from imsrc.imaging import decode, model_image, phash64
from imsrc.ingest.service import ingest_bytes
from imsrc.search.duplicates import DuplicateSearchRepository, _candidates, to_signed, within
from imsrc.search.schemas import SearchOptions
from imsrc.search.service import SearchRuntime
from tests.fixtures.database import database_for
from tests.helpers import run_cli

MODEL = "open_clip-tiny-test"
GROUPS = {
    "people": ("astronaut", "camera", "page", "text"),
    "things": ("coffee", "rocket", "clock", "colorwheel"),
    "textures": ("brick", "grass", "gravel", "moon"),
    "science": ("hubble_deep_field", "immunohistochemistry", "cell", "coins"),
}
MODES = [("exact", None), ("ann", "pgvector"), ("ann", "faiss"), ("two_stage", "pgvector"), ("two_stage", "faiss")]


def _encode(img: Image.Image, fmt: str = "PNG", **kw: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(name: str) -> Image.Image:
    arr = getattr(samples, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _edited(img: Image.Image, quality: int = 25) -> bytes:
    """The edit of issue 18's first row: half size, JPEG quality 25."""
    half = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
    return _encode(half, "JPEG", quality=quality)


def _hash(data: bytes) -> int:
    return phash64(model_image(decode(data, max_pixels=10**8).image))


@dataclass
class Catalog:
    url: str
    settings: Settings
    database: Database
    folder: Path
    ids: dict[str, int]
    category_ids: dict[str, int]


@pytest.fixture(scope="module")
def catalog(create_database) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_search_dups")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-search-dups-"))
    settings = Settings(
        database_url=url,
        data_dir=folder / "data",
        model=MODEL,
        search_exact_max_rows=2,
        faiss_flat_max_rows=2,
        search_two_stage_min_rows=0,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]
    database = database_for(settings)
    embedder = get_embedder(MODEL)
    ids: dict[str, int] = {}
    for category, names in GROUPS.items():
        files = [(f"{n}.png", _encode(_photo(n))) for n in names]
        if category == "textures":  # a recompressed copy of coffee, filed elsewhere: a stored near-duplicate
            files.append(("coffee-copy.jpg", _encode(_photo("coffee"), "JPEG", quality=60)))
        with database.session() as session:
            outcomes = ingest_bytes(session, embedder, files, settings=settings, category=category)
        for (name, _), outcome in zip(files, outcomes, strict=True):
            assert outcome.image_id is not None, outcome
            ids[name.rsplit(".", 1)[0]] = int(outcome.image_id)
    with database.session() as session:
        cats = {str(n): int(i) for n, i in session.execute(text("SELECT name, id FROM categories"))}
        canonical = session.execute(
            text("SELECT canonical_id FROM images WHERE id = :i"), {"i": ids["coffee-copy"]}
        ).scalar()
        assert canonical == ids["coffee"]  # ingest grouped the copy with its original
        # Stage 1 must send the astronaut's edited copy elsewhere: the "people" prototypes point away from it.
        vector = session.execute(
            text("SELECT embedding::text FROM embeddings WHERE image_id = :i"), {"i": ids["astronaut"]}
        ).scalar_one()
        away = vector_literal(-np.asarray(json.loads(vector), dtype=np.float32))
        session.execute(
            text(
                "UPDATE category_prototypes SET vector = CAST(:v AS vector), updated_at = now() WHERE category_id = :c"
            ),
            {"v": away, "c": cats["people"]},
        )
    yield Catalog(url, settings, database, folder, ids, cats)
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


def test_edited_copy_is_first_and_marked_in_every_mode(catalog: Catalog) -> None:
    query = _edited(_photo("astronaut"))
    with catalog.database.session() as session:
        stored = DuplicateSearchRepository(session).stored_phash(catalog.ids["astronaut"])
    assert stored is not None and (stored ^ _hash(query)).bit_count() <= catalog.settings.duplicate_threshold
    runtime = SearchRuntime.create(catalog.settings)
    for mode, backend in MODES:
        with catalog.database.session() as session:
            got = runtime.service(session).search_image(
                query, SearchOptions(k=4, mode=mode, backend=backend, categories=1)
            )  # type: ignore[arg-type]
        assert got.results[0].id == catalog.ids["astronaut"], (mode, backend, got.results)
        assert got.results[0].match_type == "duplicate" and got.results[0].phash_distance is not None
        assert len(got.results) == 4
        assert all(r.match_type == "similar" and r.phash_distance is None for r in got.results[1:])
        if mode == "two_stage":
            # The case the marker exists for: stage 1 picked another category, stage 2 never saw the original.
            assert got.mode == "two_stage" and [c.category for c in got.stage1] != ["people"]
            assert len(got.stage1) == 1 and got.results[0].category == "people"
            assert all(r.category == got.stage1[0].category for r in got.results[1:])


def test_unrelated_query_has_no_duplicate_marks(catalog: Catalog) -> None:
    rng = np.random.default_rng(7)
    noise = _encode(Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), "RGB"))
    runtime = SearchRuntime.create(catalog.settings)
    for mode, backend in MODES:
        with catalog.database.session() as session:
            got = runtime.service(session).search_image(noise, SearchOptions(k=5, mode=mode, backend=backend))  # type: ignore[arg-type]
        assert len(got.results) == 5
        assert {r.match_type for r in got.results} == {"similar"}


def test_explicit_category_filter_still_limits_duplicates(catalog: Catalog) -> None:
    """Only stage 1's own choice is overruled; a category the user names is a filter the duplicates obey."""
    runtime = SearchRuntime.create(catalog.settings)
    with catalog.database.session() as session:
        got = runtime.service(session).search_image(
            _edited(_photo("astronaut")), SearchOptions(k=3, category=["things"])
        )
    assert {r.category for r in got.results} == {"things"}
    assert {r.match_type for r in got.results} == {"similar"}


def test_api_cli_and_similar_show_the_marker(catalog: Catalog) -> None:
    query = _edited(_photo("rocket"), quality=30)
    with TestClient(create_app(catalog.settings, database=catalog.database)) as client:
        resp = client.post(
            "/api/search/image?k=3&mode=two_stage&categories=1", files={"file": ("q.jpg", query, "image/jpeg")}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["results"][0]["id"] == catalog.ids["rocket"]
        assert body["results"][0]["match_type"] == "duplicate"
        assert [r["match_type"] for r in body["results"][1:]] == ["similar", "similar"]
        # "more like this" on a stored copy: its original first, marked; the copy itself never.
        resp = client.get(f"/api/search/similar/{catalog.ids['coffee-copy']}?k=3&categories=1")
        body = resp.json()
        assert resp.status_code == 200 and body["results"][0]["id"] == catalog.ids["coffee"]
        assert body["results"][0]["match_type"] == "duplicate"
        assert catalog.ids["coffee-copy"] not in [r["id"] for r in body["results"]]
        # From the original, the copy is a hidden duplicate by default, first when duplicates are asked for.
        resp = client.get(f"/api/search/similar/{catalog.ids['coffee']}?k=3&include_duplicates=true")
        first = resp.json()["results"][0]
        assert first["id"] == catalog.ids["coffee-copy"] and first["match_type"] == "duplicate"
        resp = client.get(f"/api/search/similar/{catalog.ids['coffee']}?k=3")
        assert {r["match_type"] for r in resp.json()["results"]} == {"similar"}
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchHit"]["properties"]
        assert schema["match_type"]["enum"] == ["duplicate", "similar", "partial"]
    path = catalog.folder / "query.jpg"
    path.write_bytes(query)
    env = {"IMSRC_DATABASE_URL": catalog.url, "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"), "IMSRC_MODEL": MODEL}
    res = run_cli("search", "image", str(path), "-k", "2", "--json", env=env)
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)["results"]
    assert hits[0]["id"] == catalog.ids["rocket"] and hits[0]["match_type"] == "duplicate"
    res = run_cli("search", "image", str(path), "-k", "2", env=env)
    assert res.returncode == 0 and "duplicate (d=" in res.stdout


def test_band_lookup_equals_brute_force_and_uses_the_band_indexes(session) -> None:  # type: ignore[no-untyped-def]
    """20,000 random hashes plus planted ones at distances 0-8 from a probe: the look-up returns exactly the
    hashes a brute-force scan finds for every threshold (the pigeonhole bands miss nothing), and on a table
    this size the planner takes the band indexes."""
    rng = np.random.default_rng(3)
    probe = int(rng.integers(0, 2**63)) << 1 | 1
    hashes = [int(h) for h in rng.integers(0, 2**63, 20_000, dtype=np.int64)]
    for d in range(9):  # spread the flipped bits over the bands, worst case for the pigeonhole bound
        bits = rng.choice(64, size=d, replace=False)
        hashes.append(probe ^ sum(1 << int(b) for b in bits))
    session.execute(
        text(
            "INSERT INTO images (sha256, phash, width, height, format, byte_size) "
            "SELECT sha256(int8send(o)), CAST(h AS bit(64)), 8, 8, 'PNG', 1 FROM unnest(CAST(:h AS bigint[])) "
            "WITH ORDINALITY AS v(h, o)"
        ),
        {"h": [to_signed(h) for h in hashes]},
    )
    session.execute(text("ANALYZE images"))
    repo = DuplicateSearchRepository(session)
    for threshold in (0, 3, 4, 7, 8, 12):
        where_ids = session.execute(
            text(
                "SELECT phash::bigint FROM images WHERE phash IS NOT NULL AND "
                "bit_count(phash # CAST(:p AS bigint)::bit(64)) <= :t"
            ),
            {"p": to_signed(probe), "t": threshold},
        )
        expected = sorted(h & (2**64 - 1) for h in where_ids.scalars())
        brute = sorted(h for h in hashes if (h ^ probe).bit_count() <= threshold)
        assert expected == brute and len(brute) >= min(threshold, 8) + 1
        sql_where, params = _candidates(probe, threshold)
        found = session.execute(text(f"SELECT phash::bigint FROM images WHERE {sql_where}"), params).scalars()
        assert sorted(h & (2**64 - 1) for h in found) == brute, threshold
    plan = repo.explain(probe, 4)
    assert all(f"ix_images_phash_band{i}" in plan for i in range(4)), plan
    assert "Seq Scan" not in plan


def test_band_probe_values() -> None:
    assert within(0, 0) == [0]
    assert sorted(within(0, 1)) == [0] + [1 << b for b in range(16)]
    assert len(set(within(0xBEEF, 2))) == 1 + 16 + 120


# ------------------------------------------------------------------ re-ranking comparators (issue 18, item 3)
def test_ssim_matches_scikit_image_and_comparators_are_one_on_identity() -> None:
    from skimage.metrics import structural_similarity

    from imsrc.search import rerank

    a, b = rerank.prepare(_photo("astronaut")), rerank.prepare(_photo("camera"))
    for x, y in ((a, b), (a, rerank.prepare(Image.open(io.BytesIO(_edited(_photo("astronaut"))))))):
        ref = structural_similarity(
            rerank._grey(x),
            rerank._grey(y),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=True,
            data_range=255,
        )
        assert rerank.ssim(x, y) == pytest.approx(ref, abs=1e-6)
    for name in ("ssim", "histogram", "pixel"):
        assert rerank.SCORERS[name](a, a) == pytest.approx(1.0)
        assert rerank.SCORERS[name](a, b) < 0.9


def test_rerank_orders_candidates_by_the_comparator(catalog: Catalog) -> None:
    from imsrc.search import rerank

    query = _encode(_photo("gravel").transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # mirrored: no pHash match
    runtime = SearchRuntime.create(catalog.settings)
    with catalog.database.session() as session:
        service = runtime.service(session)
        plain = service.search_image(query, SearchOptions(k=40, mode="exact"))
        assert {r.match_type for r in plain.results} == {"similar"} and plain.rerank is None
        for comparator in ("ssim", "histogram", "pixel"):
            got = service.search_image(
                query,
                SearchOptions(
                    k=5,
                    mode="exact",
                    rerank=comparator,  # type: ignore[arg-type]
                    rerank_top=40,
                ),
            )
            # what the comparator says about every image in the catalog, from the stored thumbnails
            every = rerank.scores(
                comparator,
                Image.open(io.BytesIO(query)),
                rerank.ThumbnailRepository(session).images([r.id for r in plain.results]),
            )
            best = sorted(every, key=lambda i: -every[i])[:5]
            assert got.rerank == comparator and [r.id for r in got.results] == best
            assert [r.rerank_score for r in got.results] == [every[i] for i in best]
            cosine = {r.id: r.score for r in plain.results}
            assert all(r.score == cosine[r.id] for r in got.results)  # both scores are returned
        # only the first rerank_top candidates are re-scored; the rest keep stage 2's order
        got = service.search_image(query, SearchOptions(k=6, mode="exact", rerank="pixel", rerank_top=2))
        assert [r.rerank_score is not None for r in got.results] == [True, True] + [False] * 4
        assert {r.id for r in got.results[:2]} == {r.id for r in plain.results[:2]}
        assert [r.id for r in got.results[2:]] == [r.id for r in plain.results[2:6]]
        # near-duplicates stay first under any comparator
        got = service.search_image(_edited(_photo("astronaut")), SearchOptions(k=3, rerank="histogram", categories=1))
        assert got.results[0].id == catalog.ids["astronaut"] and got.results[0].match_type == "duplicate"
        assert got.results[0].rerank_score is not None
        # "more like this" compares the image's own thumbnail
        got = service.similar(catalog.ids["brick"], SearchOptions(k=3, mode="exact", rerank="ssim"))
        assert got.rerank == "ssim" and all(r.rerank_score is not None for r in got.results)


def test_orb_and_sift_put_rotated_brighter_and_mirrored_copies_first(catalog: Catalog) -> None:
    """The keypoint comparators: a copy rotated 12 degrees and 30 % brighter, and a mirrored copy (neither is
    a pHash near-duplicate), come first by RANSAC inliers; unrelated candidates score 0 (under MIN_INLIERS);
    the cost of the comparator is reported apart."""
    from PIL import ImageEnhance

    from imsrc.search.keypoints import MIN_INLIERS

    photo = _photo("rocket")
    rotated = ImageEnhance.Brightness(photo.rotate(12, Image.Resampling.BICUBIC)).enhance(1.3)
    runtime = SearchRuntime.create(catalog.settings)
    with catalog.database.session() as session:
        service = runtime.service(session)
        for query in (_encode(rotated, "JPEG", quality=90), _encode(ImageOps.mirror(photo))):
            for comparator in ("orb", "sift"):
                got = service.search_image(
                    query,
                    SearchOptions(
                        k=4,
                        mode="exact",
                        rerank=comparator,  # type: ignore[arg-type]
                        rerank_top=17,
                    ),
                )
                first = got.results[0]
                assert first.id == catalog.ids["rocket"] and first.match_type == "similar", (comparator, got)
                assert first.rerank_score is not None and first.rerank_score >= MIN_INLIERS
                assert got.results[-1].rerank_score == 0.0
                assert got.rerank == comparator and got.timings_ms.rerank > 0


def test_rerank_bad_input_is_a_clear_4xx(catalog: Catalog) -> None:
    with TestClient(create_app(catalog.settings, database=catalog.database)) as client:
        files = {"file": ("q.png", _encode(_photo("coins")), "image/png")}
        for query, needle in (
            ("rerank=surf", "sift"),
            ("rerank=ssim&rerank_top=0", "rerank_top"),
            ("rerank=ssim&rerank_top=201", "rerank_top"),
        ):
            resp = client.post(f"/api/search/image?{query}", files=files)
            assert 400 <= resp.status_code < 500 and needle in resp.json()["error"]["message"], resp.text
        resp = client.get("/api/search/text?q=coins&rerank=ssim")
        assert resp.status_code == 422 and "image query" in resp.json()["error"]["message"]
        resp = client.post("/api/search/image?rerank=pixel&rerank_top=3&k=2&mode=exact", files=files)
        assert resp.status_code == 200 and resp.json()["rerank"] == "pixel"
        assert all(r["rerank_score"] is not None for r in resp.json()["results"])
        # a 1x1 query has no keypoints: every candidate scores 0 (ORB's pyramid assertion made this a 500)
        tiny = {"file": ("dot.png", _encode(Image.new("RGB", (1, 1), "red")), "image/png")}
        for comparator in ("orb", "sift"):
            resp = client.post(f"/api/search/image?rerank={comparator}&k=3&mode=exact", files=tiny)
            assert resp.status_code == 200, resp.text
            assert [r["rerank_score"] for r in resp.json()["results"]] == [0.0, 0.0, 0.0]
    env = {"IMSRC_DATABASE_URL": catalog.url, "IMSRC_DATA_DIR": str(catalog.folder / "cli-data"), "IMSRC_MODEL": MODEL}
    path = catalog.folder / "coins.png"
    path.write_bytes(_encode(_photo("coins")))
    res = run_cli("search", "image", str(path), "--rerank", "surf", env=env)
    assert res.returncode == 1 and "--rerank" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("search", "image", str(path), "-k", "2", "--rerank", "ssim", "--rerank-top", "5", env=env)
    assert res.returncode == 0 and "ssim" in res.stdout, res.stderr


def test_url_query_puts_the_duplicate_first(catalog: Catalog) -> None:
    """POST /api/search/image with {"url": ...}: the fetched bytes are hashed like an upload."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = _edited(_photo("colorwheel"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        settings = catalog.settings.model_copy(update={"url_fetch_allow_private": True})
        with TestClient(create_app(settings, database=catalog.database)) as client:
            resp = client.post(
                "/api/search/image?k=3&categories=1", json={"url": f"http://127.0.0.1:{httpd.server_address[1]}/q.jpg"}
            )
        assert resp.status_code == 200, resp.text
        hits = resp.json()["results"]
        assert hits[0]["id"] == catalog.ids["colorwheel"] and hits[0]["match_type"] == "duplicate"
        assert [h["match_type"] for h in hits[1:]] == ["similar", "similar"]
    finally:
        httpd.shutdown()
        httpd.server_close()
