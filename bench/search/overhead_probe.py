"""Where a search's fixed cost goes: SearchService.similar on a small real catalog, per mode, with the SQL statements
one request sends and the time split the response reports (a developer's tool, not a published figure).

    PYTHONPATH=backend python bench/search/overhead_probe.py --count              # builds a 3k catalog once
    PYTHONPATH=backend python bench/search/overhead_probe.py --dump /tmp/a.json   # ids and scores per query

The catalog (Fashion-MNIST embedded with EfficientNet-Lite0, as `service_bench.py --real 3000` loads it) and its
embedded PostgreSQL are kept in --dir, so two checkouts can be compared on the same rows: run this script from
each (PYTHONPATH=<checkout>/backend python <checkout>/bench/search/overhead_probe.py ...) in turns, and compare the
--dump files for identical results. Printed per mode: p50 of the whole call (session, service, commit), of
timings_ms stage 2 and of the rest. --count adds the statements of one request: what SQLAlchemy sent, and each
pipeline of pg_queries.read_with_settings (one round trip). Not counted: the pool's ping, BEGIN and COMMIT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import event, text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.bench_common import database_url  # noqa: E402
from bench.search.load import load, prewarm, start_server  # noqa: E402

from imsrc.config import Settings  # noqa: E402
from imsrc.db.embedded import EmbeddedServer  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search import pg_queries  # noqa: E402
from imsrc.search.pg_queries import HNSW_EF_CONSTRUCTION, HNSW_M  # noqa: E402
from imsrc.search.schemas import SearchOptions  # noqa: E402
from imsrc.search.service import SearchRuntime  # noqa: E402

NAME = "imsrc_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "results" / "tmp" / "overhead-probe")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--modes", default="exact,ann:pgvector,two_stage:pgvector,two_stage:faiss")
    parser.add_argument("--count", action="store_true", help="print the statements of one request per mode")
    parser.add_argument("--force-two-stage", action="store_true", help="IMSRC_SEARCH_TWO_STAGE_MIN_ROWS=0")
    parser.add_argument("--dump", type=Path, help="write each query's (id, score) results here")
    args = parser.parse_args()
    if not 1 <= args.rows <= 70_000 or args.queries < 1:
        parser.error("--rows 1..70000 and --queries >= 1")
    from bench.search import real

    real.check_available()
    fresh = not (args.dir / "built").exists()
    if fresh:
        server, url = start_server(args.dir / "server", "1GB")
    else:
        server = EmbeddedServer(args.dir / "server")
        url = server.start().url("postgres")
    try:
        run(args, url, fresh, real)
    finally:
        server.stop()


def run(args: argparse.Namespace, url: str, fresh: bool, real: Any) -> None:
    db_url = database_url(url, NAME)
    if fresh:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{NAME}"')
    upgrade(db_url)
    extra = {"search_two_stage_min_rows": 0} if args.force_two_stage else {}
    settings = Settings(database_url=db_url, data_dir=args.dir / "data", _env_file=None, **extra)  # type: ignore[call-arg]
    engine = make_engine(db_url)
    db = Database(url=db_url, engine=engine, settings=settings, revision="head", pgvector_version="")
    try:
        if fresh:
            vectors, labels, _ = real.embed(args.rows, "onnx")
            names = real.CLASSES
            load(db, settings, vectors, labels, int(labels.max()) + 1, model_name=real.MODEL, category_names=names,
                 global_graph=(HNSW_M, HNSW_EF_CONSTRUCTION))  # fmt: skip
            (args.dir / "built").write_text("1")
        prewarm(db)
        with db.session() as session:
            ids = [int(r[0]) for r in session.execute(text("SELECT image_id FROM embeddings ORDER BY image_id"))]
        queries = [int(i) for i in np.random.default_rng(3).choice(ids, min(args.queries, len(ids)), replace=False)]
        runtime = SearchRuntime.create(settings, embedder_factory=lambda name: None)
        modes = [(m.partition(":")[0], m.partition(":")[2] or None) for m in args.modes.split(",")]

        def call(image_id: int, mode: str, backend: str | None) -> tuple[float, Any]:
            started = time.perf_counter()
            with db.session() as session:
                resp = runtime.service(session).similar(image_id, SearchOptions(k=10, mode=mode, backend=backend))  # type: ignore[arg-type]
            return (time.perf_counter() - started) * 1000, resp

        for image_id in queries[:5]:  # plans, caches, the FAISS index: not measured
            for mode, backend in modes:
                call(image_id, mode, backend)
        if args.count:
            sent: list[str] = []
            listener = lambda *a: sent.append(" ".join(str(a[2]).split())[:70])  # noqa: E731
            event.listen(engine, "before_cursor_execute", listener)
            original = getattr(pg_queries, "read_with_settings", None)
            if original is not None:  # its pipelines go around SQLAlchemy: one round trip each

                def counted(session: Any, sql: str, *rest: Any) -> Any:
                    sent.append("pipeline: " + " ".join(sql.split())[:60])
                    return original(session, sql, *rest)

                pg_queries.read_with_settings = counted
            for mode, backend in modes:
                sent.clear()
                call(queries[0], mode, backend)
                print(f"{mode}:{backend}: {len(sent)} statements: {sent}")
            event.remove(engine, "before_cursor_execute", listener)
            if original is not None:
                pg_queries.read_with_settings = original
        wall: dict[str, list[float]] = {}
        stage2: dict[str, list[float]] = {}
        found: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for image_id in queries:
            for mode, backend in modes:
                key = f"{mode}:{backend}"
                took, resp = call(image_id, mode, backend)
                wall.setdefault(key, []).append(took)
                stage2.setdefault(key, []).append(resp.timings_ms.stage2)
                found.setdefault(key, {})[str(image_id)] = [(h.id, h.score) for h in resp.results]
        for key in wall:
            w, s = statistics.median(wall[key]), statistics.median(stage2[key])
            print(f"{key:22s} p50 {w:6.2f} ms   stage 2 {s:6.2f} ms   the rest {w - s:6.2f} ms")
        if args.dump:
            args.dump.write_text(json.dumps(found, sort_keys=True))
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
