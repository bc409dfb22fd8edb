"""Memory of a live server under a burst of big query images (issue 12, item 3).

Four concurrent searches with a 335 KB 9400x9400 RGBA PNG once took `imsrc serve` from 2.1 to 5.2 GB, and it
kept that memory. Here a real server process (`imsrc serve` on the test database) gets four concurrent
searches with a 49-megapixel RGBA PNG (just under IMSRC_QUERY_MAX_PIXELS): its peak must stay near two decodes
(IMSRC_MAX_CONCURRENT_DECODES=2) and its resident memory must come back near where it started."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image as PILImage

from imsrc.config import Settings
from imsrc.embeddings.registry import get_embedder
from imsrc.ingest.service import ingest_bytes
from tests.fixtures.database import database_for
from tests.fixtures.servers import live_server, serve_env
from tests.helpers import make_image
from tests.ingest_support import TEST_MODEL

MB = 1024 * 1024
SIDE = 7000  # 49 MP: 196 MB as RGBA


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


@pytest.fixture(scope="module")
def server(create_database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_memory")
    data_dir = tmp_path_factory.mktemp("memory-data")
    settings = Settings(database_url=url, data_dir=data_dir, model=TEST_MODEL, _env_file=None)  # type: ignore[call-arg]
    db = database_for(settings)
    with db.session() as session:
        ingest_bytes(
            session,
            get_embedder(TEST_MODEL),
            [(f"{i}.png", make_image(i)) for i in range(4)],
            settings=settings,
            category="things",
        )
    db.dispose()
    # The test is about memory, not about turning requests away: let every query wait its turn. One worker:
    # the memory measured is the server pid's own.
    env = serve_env(data_dir, database_url=url, model=TEST_MODEL, IMSRC_DECODE_WAIT_S="300", IMSRC_WORKERS_HTTP="1")
    with live_server(env, tmp_path_factory.mktemp("memory-log") / "serve.log") as running:
        yield running.base, running.proc.pid


@pytest.mark.slow
def test_memory_returns_to_baseline_after_a_burst_of_big_queries(server: tuple[str, int]) -> None:
    base, pid = server
    buf = io.BytesIO()
    PILImage.new("RGBA", (SIDE, SIDE), (20, 120, 200, 180)).save(buf, "PNG")
    big = buf.getvalue()
    assert len(big) < 1 * MB  # a small upload that decodes to 196 MB

    def search(data: bytes) -> int:
        return httpx.post(
            f"{base}/api/search/image", files={"file": ("q.png", data, "image/png")}, timeout=600
        ).status_code

    for _ in range(2):  # warm up: the model, the code paths, the connection pool
        assert search(make_image(9, size=(300, 200))) == 200
    baseline = _status_kb(pid, "VmRSS")
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(search, [big] * 4))
    assert statuses == [200] * 4
    peak = _status_kb(pid, "VmHWM")
    time.sleep(1.0)
    after = _status_kb(pid, "VmRSS")
    grew_mb = (peak - baseline) / 1024
    kept_mb = (after - baseline) / 1024
    # Two decodes at a time: 2 x 196 MB of pixels plus small working images; four at once was 4 x ~600 MB.
    assert grew_mb < 700, f"peak {grew_mb:.0f} MB above the baseline"
    print(f"baseline {baseline // 1024} MB, peak +{grew_mb:.0f} MB, after +{kept_mb:.0f} MB")
    assert kept_mb < 150, f"{kept_mb:.0f} MB still held after the burst (baseline {baseline // 1024} MB)"
