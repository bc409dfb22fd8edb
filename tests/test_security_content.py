"""Hostile content (issue 12): formats outside the documented list, images too big to decode, concurrent decodes,
files swapped under an indexed folder, what error messages and details reveal, and searches that must return k.

Each test here failed before its fix (see the commit messages); the kinds of input are the ones a red-team pass
used against a running server."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings.registry import get_embedder
from imsrc.ingest.pipeline import run_index_job
from imsrc.ingest.repository import JobRepository
from imsrc.search.schemas import SearchOptions, SearchResponse
from imsrc.search.service import SearchRuntime, SearchService
from imsrc.search.sync import sync_search
from tests.fixtures.api import add_image
from tests.fixtures.database import fresh_database
from tests.helpers import make_image
from tests.ingest_support import TEST_MODEL, open_test_database, write
from tests.search_data import Synthetic, brute_force, make_catalog

COUNTS = (
    "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM image_blobs), (SELECT count(*) FROM thumbnails),"
    " (SELECT count(*) FROM embeddings), (SELECT count(*) FROM categories)"
)
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, TIFF"


@pytest.fixture(scope="module")
def env(create_database, settings: Settings) -> Iterator[tuple[TestClient, Database, Settings]]:  # type: ignore[no-untyped-def]
    db = fresh_database(create_database, settings, "imsrc_content", max_pixels=60_000_000)
    own = db.settings
    with TestClient(create_app(own, database=db)) as client:
        for i in range(3):  # something to search in
            ok = client.post(
                "/api/images", files={"file": (f"good{i}.png", make_image(i, size=(64, 64)))}, data={"category": "good"}
            )
            assert ok.status_code == 200, ok.text
        yield client, db, own
    db.dispose()


def _counts(db: Database) -> tuple[int, ...]:
    with db.engine.connect() as conn:
        return tuple(conn.execute(text(COUNTS)).one())


def _encode(img: PILImage.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _other_formats() -> dict[str, bytes]:
    """Formats Pillow decodes but the documentation does not list, each written by Pillow itself."""
    rgb = PILImage.open(io.BytesIO(make_image(5, size=(48, 40)))).convert("RGB")
    out: dict[str, bytes] = {}
    for fmt, img in [
        ("TGA", rgb),
        ("PPM", rgb),
        ("ICO", rgb),
        ("QOI", rgb),
        ("PCX", rgb),
        ("SGI", rgb),
        ("IM", rgb),
        ("DDS", rgb.convert("RGBA")),
        ("JPEG2000", rgb),
        ("SPIDER", rgb.convert("F")),
        ("XBM", rgb.convert("1")),
        ("EPS", rgb),
    ]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Pillow is retiring IM
                data = _encode(img, fmt)
                PILImage.open(io.BytesIO(data)).load()  # only formats Pillow decodes need stopping
        except Exception:  # no encoder or decoder in this Pillow build
            continue
        out[fmt] = data
    return out


OTHER_FORMATS = _other_formats()


def test_the_probe_found_formats_to_refuse() -> None:
    assert {"TGA", "PPM", "ICO", "QOI", "PCX", "SGI", "IM"} <= set(OTHER_FORMATS)


# ------------------------------------------------------------------ item 12: the format allow-list
@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_formats_outside_the_documented_list_are_refused(env: tuple[TestClient, Database, Settings], fmt: str) -> None:
    client, db, _ = env
    data = OTHER_FORMATS[fmt]
    before = _counts(db)
    for name in (f"x.{fmt.lower()}", "looks-fine.png", "photo.jpg"):  # content decides, not the name
        upload = client.post("/api/images", files={"file": (name, data, "image/png")})
        assert upload.status_code == 422, (fmt, upload.text)
        assert upload.json()["error"]["code"] == "invalid_image"
        assert ACCEPTED in upload.json()["error"]["message"]
        search = client.post("/api/search/image", files={"file": (name, data, "image/png")})
        assert search.status_code == 422, (fmt, search.text)
        assert search.json()["error"]["code"] == "not_an_image"
        assert ACCEPTED in search.json()["error"]["message"]
    assert _counts(db) == before


def test_folder_indexing_skips_other_formats_with_a_reason(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    db = open_test_database(create_database("imsrc_formats"), scratch / "data")
    try:
        root = scratch / "photos"
        write(root / "good.png", make_image(3, size=(40, 40)))
        write(root / "fake.png", OTHER_FORMATS["PPM"])
        write(root / "fake.jpg", OTHER_FORMATS["TGA"])
        write(root / "fake.bmp", OTHER_FORMATS["PCX"])
        run_index_job(db, get_embedder(TEST_MODEL), [str(root)], workers=1)
        with db.engine.connect() as conn:
            stored = set(conn.execute(text("SELECT original_name FROM images")).scalars())
            reasons = dict(conn.execute(text("SELECT path, reason FROM ingest_files WHERE outcome = 'failed'")).all())
    finally:
        db.dispose()
    assert stored == {"good.png"}
    assert {Path(p).name for p in reasons} == {"fake.png", "fake.jpg", "fake.bmp"}
    assert all(r.startswith("not a recognised image format") and ACCEPTED in r for r in reasons.values())


# ------------------------------------------------------------------ item 3 and 13: too many pixels
def _png_header_only(width: int, height: int, colour_type: int = 6, depth: int = 8) -> bytes:
    """A PNG that claims width x height pixels but carries a few rows: a few hundred bytes on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * (width * 4 + 1) * 4))
        + chunk(b"IEND", b"")
    )


def test_query_pixel_limit_is_checked_from_the_header(env: tuple[TestClient, Database, Settings]) -> None:
    client, _, settings = env
    assert settings.query_max_pixels == 50_000_000 < settings.max_pixels
    # 56 MP: under the upload limit, over the query limit. Only the header is real, so a decoder would fail
    # with "corrupt": the answer shows the limit was checked before decoding.
    response = client.post("/api/search/image", files={"file": ("big.png", _png_header_only(8000, 7000))})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "image_too_large"
    assert error["message"] == (
        "image is 8000x7000 = 56000000 pixels, over the limit of 50000000 (IMSRC_QUERY_MAX_PIXELS)"
    )
    categories = client.post("/api/search/categories", files={"file": ("big.png", _png_header_only(8000, 7000))})
    assert categories.status_code == 422 and categories.json()["error"]["code"] == "image_too_large"


@pytest.mark.parametrize("size", [(9400, 9400), (20_000, 20_000), (70_000, 70_000)])
def test_a_too_large_image_is_reported_as_too_large(
    env: tuple[TestClient, Database, Settings], size: tuple[int, int]
) -> None:
    client, db, _ = env
    data = _png_header_only(*size)
    search = client.post("/api/search/image", files={"file": ("huge.png", data)})
    assert search.status_code == 422
    error = search.json()["error"]
    assert error["code"] == "image_too_large" and "over the limit" in error["message"], error
    assert "Pillow" not in error["message"]
    before = _counts(db)
    upload = client.post("/api/images", files={"file": ("huge.png", data)})
    assert upload.status_code == 422
    message = upload.json()["error"]["message"]
    assert "over the limit" in message and "IMSRC_MAX_PIXELS" in message
    assert _counts(db) == before


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's high-water mark (Linux carries it over exec).
_PEAK_PROBE = """
import sys
from imsrc.ingest.decode import DecodeOptions, WorkItem, process
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
data = open(sys.argv[1], "rb").read()
before = hwm()
result = process(WorkItem(key="x.png", data=data), DecodeOptions(preprocess=None, max_pixels=10**9))
print(result.ok, result.reason, result.width, result.height, result.thumb_width, (hwm() - before) // 1024)
"""


def _run_peak_probe(path: Path) -> tuple[bool, int, int, int, int]:
    import imsrc  # the child imports the same imsrc as this process

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(imsrc.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(path)], capture_output=True, text=True, env=env, timeout=300, check=True
    ).stdout.split()
    return out[0] == "True", int(out[2]), int(out[3]), int(out[4]), int(out[5])


def test_sixteen_bit_greyscale_decodes_in_bounded_memory(scratch: Path) -> None:
    """A 16-bit greyscale PNG of 64 MP is 128 MB decoded; it was then copied as float64 several times
    (a 172 KB upload peaked at +2 GB). The decoded pixels plus strips is all it may cost now."""
    y = np.linspace(0, 60_000, 8000, dtype=np.float32)[:, None]
    x = np.linspace(0, 5_000, 8000, dtype=np.float32)[None, :]
    grey = PILImage.fromarray((y + x).astype(np.uint16))
    assert grey.mode == "I;16"
    path = scratch / "grey16.png"
    grey.save(path, "PNG", compress_level=1)
    del grey, y, x
    ok, width, height, thumb_width, peak_mb = _run_peak_probe(path)
    assert ok and (width, height) == (8000, 8000) and thumb_width == 256
    assert peak_mb < 400, f"decoding took {peak_mb} MB above the baseline"  # 151 here; 1590 before


def test_large_jpeg_is_decoded_at_a_reduced_scale(scratch: Path) -> None:
    """A 60 MP JPEG decodes at 1/2 or 1/4 scale (libjpeg's DCT scaling): far less than its 180 MB of RGB."""
    arr = np.zeros((6000, 10_000, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 10_000, dtype=np.uint8)[None, :]
    path = scratch / "big.jpg"
    PILImage.fromarray(arr).save(path, "JPEG", quality=80)
    del arr
    ok, width, height, thumb_width, peak_mb = _run_peak_probe(path)
    assert ok and (width, height) == (10_000, 6000) and thumb_width == 256
    assert peak_mb < 160, f"decoding took {peak_mb} MB above the baseline"  # 80 here; 491 decoded whole


# ------------------------------------------------------------------ item 3: concurrent decodes are bounded
def test_decodes_beyond_the_limit_wait_then_get_503(create_database, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    db = fresh_database(create_database, settings, "imsrc_busy", max_concurrent_decodes=1, decode_wait_s=0.3)
    own = db.settings
    try:
        with TestClient(create_app(own, database=db)) as client:
            assert client.post("/api/images", files={"file": ("a.png", make_image(1))}).status_code == 200
            before = _counts(db)
            gate = client.app.state.decode_gate  # type: ignore[attr-defined]
            assert client.app.state.search_runtime.decode_gate is gate  # type: ignore[attr-defined]
            with gate.slot():  # another request is decoding
                search = client.post("/api/search/image", files={"file": ("q.png", make_image(2))})
                upload = client.post("/api/images", files={"file": ("b.png", make_image(3))})
            for response in (search, upload):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "busy"
                assert response.headers["retry-after"] == "1"
            assert _counts(db) == before
            # The slot is free again: the same requests go through.
            assert client.post("/api/search/image", files={"file": ("q.png", make_image(2))}).status_code == 200
    finally:
        db.dispose()


def test_decode_gate_bounds_concurrency_and_trims_after_a_burst() -> None:
    from imsrc.imaging import DecodeGate

    trims: list[int] = []
    gate = DecodeGate(2, 5.0, trim=lambda: trims.append(1))
    inside, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()

    def work() -> None:
        with gate.slot():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            release.wait(5)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for _ in range(500):
        if inside[0] == 2:
            break
        release.wait(0.01)
    release.wait(0.2)  # time for a third to get in, if the gate let it
    assert inside[0] == 2 and not trims
    release.set()
    for t in threads:
        t.join()
    assert most[0] == 2
    assert trims  # the burst ended: freed memory was handed back
    with gate.slot():
        pass
    assert len(trims) >= 2  # and again after the next one, however short


def test_configuration_lists_the_new_limits(repo_root: Path) -> None:
    example = (repo_root / ".env.example").read_text()
    for line in ("IMSRC_QUERY_MAX_PIXELS=50000000", "IMSRC_MAX_CONCURRENT_DECODES=2", "IMSRC_DECODE_WAIT_S=5"):
        assert line in example.splitlines()
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (defaults.query_max_pixels, defaults.max_concurrent_decodes, defaults.decode_wait_s) == (50_000_000, 2, 5)


# ------------------------------------------------------------------ item 7: every k in 1-1000 works
def _runtime(settings: Settings, **overrides: object) -> SearchRuntime:
    tuned = settings.model_copy(update=overrides)
    return SearchRuntime.create(tuned, embedder_factory=lambda name: None)


@pytest.fixture()
def wide(session: Session, settings: Settings) -> tuple[Synthetic, Settings]:
    """Two categories of 1,300 vectors, each with its own HNSW index (and the catalog-wide one)."""
    cat = make_catalog(session, n_categories=2, per_category=1300, dimension=16, name="wide-k")
    tuned = settings.model_copy(update={"search_exact_max_rows": 100})
    sync_search(session, tuned, model_id=cat.model.id)
    return cat, tuned


@pytest.mark.parametrize(
    ("mode", "backend", "filtered"),
    [
        ("two_stage", "pgvector", False),
        ("two_stage", "pgvector", True),
        ("ann", "pgvector", False),
        ("exact", None, False),
        ("two_stage", "faiss", False),
        ("ann", "faiss", True),
    ],
)
@pytest.mark.parametrize("k", [668, 1000])
def test_k_up_to_1000_works_in_every_mode(
    session: Session, wide: tuple[Synthetic, Settings], mode: str, backend: str | None, filtered: bool, k: int
) -> None:
    """k 668-1000 asked pgvector for an ef_search of up to 1,500 (k plus the duplicate margin): 422 "1500 is
    outside the valid range for parameter hnsw.ef_search" in the default mode, with category= and on similar."""
    cat, tuned = wide
    service = SearchService(session, _runtime(tuned))
    query = cat.vectors[3]
    names = [f"{cat.model.name}-cat-00"] if filtered else []
    options = SearchOptions(k=k, mode=mode, backend=backend, categories=1, category=names)  # type: ignore[arg-type]
    got = service.search_vector(cat.model, query, options)
    assert len(got.results) == k
    truth = brute_force(
        cat.vectors, cat.image_ids, query, k, cat.labels == 0 if filtered or mode == "two_stage" else None
    )
    assert len(set(_ids(got)) & set(truth)) >= 0.95 * k
    similar = service.similar(int(cat.image_ids[3]), options)
    assert len(similar.results) == k and int(cat.image_ids[3]) not in _ids(similar)


# ------------------------------------------------------------------ item 14: two-stage fills k
def _ids(response: SearchResponse) -> list[int]:
    return [r.id for r in response.results]


@pytest.mark.parametrize("backend", ["pgvector", "faiss"])
def test_two_stage_fills_k_from_the_next_categories(session: Session, settings: Settings, backend: str) -> None:
    cat = make_catalog(session, n_categories=4, per_category=30, dimension=16, name="fill-k")
    tuned = settings.model_copy(update={"search_exact_max_rows": 10})
    sync_search(session, tuned, model_id=cat.model.id)
    service = SearchService(session, _runtime(tuned))
    first, second = cat.category_ids[0], cat.category_ids[1]
    # Category 0 becomes nothing but near-duplicates (of an image in category 1): two-stage hides them.
    session.execute(
        text("UPDATE images SET canonical_id = :c WHERE category_id = :d"),
        {"c": int(cat.image_ids[cat.labels == 1][0]), "d": first},
    )
    query = cat.centres[0]
    ann = service.search_vector(cat.model, query, SearchOptions(k=10, mode="ann", backend=backend))  # type: ignore[arg-type]
    assert len(ann.results) == 10
    for k in (5, 10, 45):
        got = service.search_vector(cat.model, query, SearchOptions(k=k, categories=1, backend=backend))  # type: ignore[arg-type]
        assert len(got.results) == k, (k, len(got.results))
        assert got.stage1[0].category_id == first  # stage 1 still picked the duplicates' category first...
        assert {r.category_id for r in got.results} <= {c.category_id for c in got.stage1}  # ...and says what else
        assert all(r.category_id != first for r in got.results)
        exact = service.search_vector(
            cat.model,
            query,
            SearchOptions(
                k=k,
                mode="exact",  # type: ignore[arg-type]
                category=[c.category for c in got.stage1],
            ),
        )
        assert len(set(_ids(got)) & set(_ids(exact))) >= 0.9 * k
    # A small category: 3 images, k=10 -> 3 of them and 7 from the next category.
    session.execute(text("UPDATE images SET canonical_id = NULL"))
    session.execute(
        text("DELETE FROM images WHERE category_id = :c AND id <> ALL(:keep)"),
        {"c": second, "keep": [int(i) for i in cat.image_ids[cat.labels == 1][:3]]},
    )
    sync_search(session, tuned, model_id=cat.model.id, category_ids=[second])
    got = service.search_vector(cat.model, cat.centres[1], SearchOptions(k=10, categories=1, backend=backend))  # type: ignore[arg-type]
    assert len(got.results) == 10
    assert sum(r.category_id == second for r in got.results) == 3
    # Uncategorised images are reached once every category is in.
    session.execute(text("UPDATE images SET category_id = NULL WHERE category_id <> :c"), {"c": second})
    sync_search(session, tuned, model_id=cat.model.id)
    got = service.search_vector(cat.model, cat.centres[1], SearchOptions(k=10, categories=1, backend=backend))  # type: ignore[arg-type]
    assert len(got.results) == 10


# ------------------------------------------------------------------ item 5: referenced files swapped after indexing
def test_referenced_file_is_served_only_while_it_holds_the_indexed_bytes(create_database, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    db = open_test_database(create_database("imsrc_refs"), scratch / "data")
    root, elsewhere = scratch / "photos", scratch / "elsewhere"
    names = ["same", "link", "html", "sizeok", "gone", "fifo", "copy1", "copy2"]
    data = {n: make_image(400 + i, size=(40, 30)) for i, n in enumerate(names)}
    data["copy2"] = data["copy1"]  # identical bytes at two paths: one image, two sources
    for n in names:
        write(root / f"{n}.png", data[n])
    write(root / "sub" / "moved.png", make_image(499, size=(40, 30)))
    try:
        run_index_job(db, get_embedder(TEST_MODEL), [str(root)], store="reference", workers=1)
        with db.engine.connect() as conn:
            ids = {Path(p).stem: int(i) for p, i in conn.execute(text("SELECT source_path, id FROM images"))}
        with TestClient(create_app(db.settings, database=db)) as client:

            def get(name: str) -> httpx.Response:
                return client.get(f"/api/images/{ids[name]}/file")

            ok = get("same")
            assert ok.status_code == 200 and ok.content == data["same"]
            assert ok.headers["content-type"] == "image/png" and ok.headers["content-length"] == str(len(ok.content))
            # Replaced by a link to a file outside the indexed folder.
            (root / "link.png").unlink()
            (root / "link.png").symlink_to("/etc/passwd")
            # Replaced by an HTML page; and by other bytes of the same size with the old mtime put back.
            html = b"<html><script>alert(document.cookie)</script></html>"
            (root / "html.png").write_bytes(html)
            stat = (root / "sizeok.png").stat()
            (root / "sizeok.png").write_bytes(b"<" * stat.st_size)
            os.utime(root / "sizeok.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
            (root / "gone.png").unlink()
            (root / "fifo.png").unlink()
            os.mkfifo(root / "fifo.png")
            # The folder above a file swapped for a link to another folder holding the very same bytes.
            write(elsewhere / "moved.png", (root / "sub" / "moved.png").read_bytes())
            (root / "sub").rename(scratch / "sub-old")
            (root / "sub").symlink_to(elsewhere, target_is_directory=True)
            # Of two paths with identical bytes, the first one disappears: the other still serves them.
            (root / "copy1.png").unlink()

            expected = {"link": 404, "html": 409, "sizeok": 409, "gone": 404, "fifo": 404, "moved": 404}
            for name, status in expected.items():
                response = get(name)
                assert response.status_code == status, (name, response.status_code, response.content[:200])
                error = response.json()["error"]
                assert error["code"] == ("conflict" if status == 409 else "not_found")
                assert str(scratch) not in error["message"] and "/" not in error["message"], error
                assert b"root:" not in response.content and b"<script>" not in response.content
            assert "no longer inside an indexed folder" in get("moved").json()["error"]["message"]
            assert "changed since it was indexed" in get("html").json()["error"]["message"]
            copy = get("copy2" if "copy2" in ids else "copy1")
            assert copy.status_code == 200 and copy.content == data["copy1"]
    finally:
        db.dispose()


def test_referenced_file_outside_every_indexed_root_is_not_served(
    client_with_key: TestClient, session: Session, scratch: Path
) -> None:
    """An image row pointing at a path no indexing job was given (a restored or hand-edited catalog)."""
    image = add_image(session, 77, stored=False, source_path=scratch / "x.png")
    response = client_with_key.get(f"/api/images/{image.id}/file")
    assert response.status_code == 404 and str(scratch) not in response.text
    JobRepository(session).create(
        kind="index", job_key="t", paths=[str(scratch)], options={}, model_id=None, model_name=None
    )
    assert client_with_key.get(f"/api/images/{image.id}/file").content == make_image(77)


# ------------------------------------------------------------------ item 13: what errors and details reveal
@pytest.fixture()
def client_with_key(settings: Settings, database: Database, session: Session) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"api_key": "s3cret"}), database=database)
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        yield c


def test_server_paths_are_shown_only_to_key_holders(
    client_with_key: TestClient, session: Session, scratch: Path
) -> None:
    (scratch / "secret-folder").mkdir()
    image = add_image(session, 78, stored=False, source_path=scratch / "secret-folder" / "y.png")
    jobs = JobRepository(session)
    job = jobs.create(kind="index", job_key="t2", paths=[str(scratch)], options={}, model_id=None, model_name=None)
    jobs.mark(job, "failed", f"cannot read {scratch}/secret-folder/y.png", finished=True)
    anonymous = client_with_key.get(f"/api/images/{image.id}")
    assert anonymous.status_code == 200 and anonymous.json()["source_path"] is None
    assert "secret-folder" not in anonymous.text
    status = client_with_key.get("/api/status")
    assert status.status_code == 200 and "secret-folder" not in status.text
    for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
        keyed = client_with_key.get(f"/api/images/{image.id}", headers=headers)
        assert keyed.json()["source_path"] == str(scratch / "secret-folder" / "y.png")
        assert "secret-folder" in client_with_key.get("/api/status", headers=headers).text
    wrong = client_with_key.get(f"/api/images/{image.id}", headers={"X-API-Key": "nope"})
    assert wrong.json()["source_path"] is None
    # The page's cookie counts as the key for reads.
    client_with_key.cookies.set("imsrc_api_key", "s3cret")
    assert client_with_key.get(f"/api/images/{image.id}").json()["source_path"] is not None
    # A missing referenced file: the 404 names the image, not the path.
    (scratch / "secret-folder" / "y.png").unlink()
    missing = client_with_key.get(f"/api/images/{image.id}/file")
    assert missing.status_code == 404 and "secret-folder" not in missing.text and str(scratch) not in missing.text


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost/x.png",
        "http://127.0.0.1.nip.invalid/x.png",
        "http://no-such-host.invalid/x.png",
        "http://[::1]:9/x.png",
    ],
)
def test_url_search_errors_do_not_reveal_name_resolution(env: tuple[TestClient, Database, Settings], url: str) -> None:
    client, _, _ = env
    response = client.post("/api/search/image", json={"url": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "url_not_allowed"
    assert "does not resolve to a public address" in error["message"]
    for revealing in ("127.0.0.1 ", "(127", "::1)", "(::1", "Name or service", "not known", "resolves to a"):
        assert revealing not in error["message"], error
