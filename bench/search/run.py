"""Search benchmark: stage-2 latency and recall@10 of exact scan, pgvector HNSW (plain, plain + category
filter, iterative scan), two-stage on pgvector and on FAISS, at 10k / 100k (/ 1M with --million) synthetic
512-d vectors in 100 Gaussian-mixture categories; plus an explicit filter of 3 random categories.

    PYTHONPATH=backend .venv/bin/python bench/search/run.py [--sizes 10000 100000] [--million]

Stage-2 internals on a lean path (no hydration, no per-request stage 1, K = 10): a developer's tool for query
shapes and thresholds. Writes bench/search/results.json and bench/search/latency.png; the published figures in
BENCHMARKS.md come from bench/search/service_bench.py, which times the service as users get it.
Every method runs on the same queries, interleaved query by query, in one process against one server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.bench_common import database_url  # noqa: E402
from bench.search.load import index_sizes, load, make_mixture, prewarm, reuse, start_server  # noqa: E402
from bench.search.report import plot  # noqa: E402
from bench.search.variants import (  # noqa: E402
    build_partitions,
    calibration_pair,
    drop_partitions,
    ensure_calibration_indexes,
    query_partitions,
)

from imsrc.catalog.repository import embedding_expr, vector_literal  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.faiss_store import FaissStore  # noqa: E402
from imsrc.search.pg_queries import NeighbourRepository, branch_plan, category_ef_search  # noqa: E402
from imsrc.search.stage1 import PrototypeCache, pick  # noqa: E402

K = 10
OUT = Path(__file__).resolve().parent
Method = Callable[[str, np.ndarray, list[int], set[int]], list[int]]
FIXED_FAN_OUT = 3


def _ids(hits: list[tuple[int, float]]) -> list[int]:
    return [h[0] for h in hits]


def plain_filter(session: Any, model_id: int, dim: int, q: str, cats: list[int], iterative: bool) -> list[int]:
    """What most users write: one HNSW index and WHERE category_id = ANY(...), default settings."""
    expr = embedding_expr(dim)
    if iterative:
        session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    rows = session.execute(
        text(
            f"SELECT image_id FROM embeddings WHERE model_id = {model_id} AND category_id = ANY(:c) "
            f"ORDER BY {expr} <=> CAST(:q AS halfvec({dim})) LIMIT {K}"
        ),
        {"q": q, "c": cats},
    ).all()
    if iterative:
        session.execute(text("SET LOCAL hnsw.iterative_scan TO DEFAULT"))
    return [int(r[0]) for r in rows]


def summarise(lat: list[float], recalls: list[float], rows: list[int]) -> dict[str, float]:
    lat_sorted = sorted(lat)
    return {
        "p50_ms": round(statistics.median(lat), 3),
        "p95_ms": round(lat_sorted[int(0.95 * (len(lat) - 1))], 3),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "mean_rows": round(float(np.mean(rows)), 2),
        "min_rows": int(min(rows)),
    }


def run_size(server_url: str, n: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    name = args.reuse or f"imsrc_bench_{n}_{uuid.uuid4().hex[:6]}"
    if not args.reuse:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(server_url, name)
    try:
        upgrade(url)
        settings = Settings(
            database_url=url,
            data_dir=scratch / name,
            _env_file=None,  # type: ignore[call-arg]
            search_exact_max_rows=args.exact_max_rows,
            search_ef_search=args.ef_search,
        )
        engine = make_engine(url)
        db = Database(url=url, engine=engine, settings=settings, revision="head", pgvector_version="")
        mixture = make_mixture(args.categories, args.dim, args.spread, seed=1, intrinsic_dim=args.intrinsic_dim)
        rng = np.random.default_rng(2)
        vectors, labels = mixture.sample(n, rng)
        queries, _ = mixture.sample(args.queries, np.random.default_rng(3))
        if args.reuse:  # measure again on a kept database (same seeds, so the same vectors)
            model, build, ids, cat_arr = reuse(db, args.reuse_build)
        else:
            model, build, ids, cat_arr = load(
                db, settings, vectors, labels, args.categories, parallel_builds=args.parallel_builds
            )
        store = FaissStore(None, flat_max_rows=settings.faiss_flat_max_rows)
        with db.session() as session:
            started = time.perf_counter()
            faiss_index = store.build(session, model, save=False)
            build["faiss_build_s"] = time.perf_counter() - started
            sizes = index_sizes(session, model.id)
            # float32 vectors (flat, and the re-rank copy of PQ ones) + 4-bit codes, d/2 per vector
            sizes["faiss_bytes"] = int(
                sum(
                    s.index.ntotal * args.dim * 4 + (s.index.ntotal * args.dim // 4 if s.kind == "pq" else 0)
                    for s in faiss_index.subs.values()
                )
            )
            # Binary COPY stored the float32 vectors bit for bit; spot-check that before using them as truth.
            from imsrc.search.repository import VectorRepository

            check = VectorRepository(session).fetch(model.id, args.dim, image_ids=ids[:: max(1, n // 500)].tolist())
            assert np.array_equal(check.vectors, vectors[:: max(1, n // 500)])
        if args.partitions:
            with db.session() as session:
                part = build_partitions(session, model.id, args.dim, sorted(set(cat_arr.tolist())))
            build.update({k: v for k, v in part.items() if k.endswith("_s")})
            sizes["partition_hnsw_bytes"] = int(part["partition_hnsw_bytes"])
        truth_vectors = vectors
        if args.prewarm:
            result_prewarm = prewarm(db)
            print(f"prewarmed {result_prewarm / 2**20:.0f} MiB into shared_buffers", flush=True)
        result = _measure(db, model, settings, queries, truth_vectors, ids, cat_arr, faiss_index, args)
        result["calibration"] = _calibrate(db, model, settings, queries, truth_vectors, ids, cat_arr, args)
        if args.partitions:
            with db.session() as session:
                drop_partitions(session)
        result.update(
            {
                "rows": n,
                "build_s": {k: round(v, 2) for k, v in build.items()},
                "sizes": sizes,
                "data": {
                    "spread": args.spread,
                    "intrinsic_dim": args.intrinsic_dim,
                    "exact_max_rows": args.exact_max_rows,
                    "ef_search": args.ef_search,
                },
            }
        )
        engine.dispose()
        return result
    finally:
        if not args.keep and not args.reuse:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _measure(
    db: Database,
    model: Any,
    settings: Settings,
    queries: np.ndarray,
    vectors: np.ndarray,
    ids: np.ndarray,
    cats: np.ndarray,
    faiss_index: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    dim = args.dim
    rng = np.random.default_rng(4)
    all_cats = np.unique(cats)
    filters = [sorted(rng.choice(all_cats, 3, replace=False).tolist()) for _ in queries]
    prototypes = PrototypeCache()
    lat: dict[str, list[float]] = {}
    rec: dict[str, list[float]] = {}
    rows: dict[str, list[int]] = {}
    stage1_recall: list[float] = []
    stage1_ms: list[float] = []
    stage1_count: list[int] = []

    def timed(label: str, fn: Method, args_: tuple[str, np.ndarray, list[int], set[int]], truth: list[int]) -> None:
        started = time.perf_counter()
        got = fn(*args_)
        lat.setdefault(label, []).append((time.perf_counter() - started) * 1000)
        rec.setdefault(label, []).append(len(set(got) & set(truth)) / len(truth))
        rows.setdefault(label, []).append(len(got))

    with db.session() as session:
        nb = NeighbourRepository(session)
        matrix = prototypes.get(session, model.id)
        base = settings.search_ef_search
        mid = model.id
        indexed = nb.category_indexes(mid)

        def ef_for(cs: list[int], near: set[int]) -> int:
            return branch_plan(indexed, cs, near, base)[1]

        def pg(ql: str, cs: list[int], near: set[int]) -> list[int]:
            branches, ef = branch_plan(indexed, cs, near, base)  # the service's own rule
            return _ids(nb.per_category(mid, dim, ql, branches, K, ef))

        # Each method: (query literal, query vector, categories, categories the query is near) -> image ids.
        routed: dict[str, Method] = {
            "exact scan (pgvector)": lambda ql, q, cs, near: _ids(nb.exact(mid, ql, K, None)),
            "pgvector HNSW, no filter": lambda ql, q, cs, near: _ids(nb.global_ann(mid, dim, ql, K, 40)),
            "pgvector HNSW + plain filter (stage-1 categories)": lambda ql, q, cs, near: plain_filter(
                session, mid, dim, ql, cs, False
            ),
            "two-stage pgvector": lambda ql, q, cs, near: pg(ql, cs, near),
            "two-stage FAISS": lambda ql, q, cs, near: _ids(faiss_index.search(q, cs, K)),
        }
        fixed: dict[str, Method] = {
            f"two-stage pgvector, always {FIXED_FAN_OUT} categories": lambda ql, q, cs, near: pg(ql, cs, near),
            f"two-stage FAISS, always {FIXED_FAN_OUT} categories": lambda ql, q, cs, near: _ids(
                faiss_index.search(q, cs, K)
            ),
        }
        filtered: dict[str, Method] = {
            "filter: exact scan": lambda ql, q, cs, near: _ids(nb.exact(mid, ql, K, cs)),
            "filter: pgvector HNSW + plain filter": lambda ql, q, cs, near: plain_filter(
                session, mid, dim, ql, cs, False
            ),
            "filter: pgvector HNSW + iterative scan": lambda ql, q, cs, near: plain_filter(
                session, mid, dim, ql, cs, True
            ),
            "filter: per-category pgvector": lambda ql, q, cs, near: pg(ql, cs, near),
            "filter: per-category FAISS": lambda ql, q, cs, near: _ids(faiss_index.search(q, cs, K)),
        }
        if args.partitions:
            routed["two-stage pgvector, LIST partitions"] = lambda ql, q, cs, near: query_partitions(
                session, dim, ql, cs, K, ef_for(cs, near)
            )
            filtered["filter: pgvector LIST partitions"] = lambda ql, q, cs, near: query_partitions(
                session, dim, ql, cs, K, ef_for(cs, near)
            )
        for warm in range(min(10, len(queries))):  # warm caches and plans; not measured
            nb.exact(mid, vector_literal(queries[warm]), K, None)
        truths, ftruths = _ground_truth(queries, vectors, ids, cats, filters)
        for i, q in enumerate(queries):
            ql = vector_literal(q)
            truth = truths[i]
            started = time.perf_counter()
            ranked = matrix.score(q)
            picked = pick(
                ranked,
                None if args.fan_out == "default" else args.fan_out,
                mass=args.score_mass,
                cap=args.max_categories,
            )
            chosen = [c.category_id for c in picked]
            stage1_ms.append((time.perf_counter() - started) * 1000)
            stage1_count.append(len(chosen))
            stage1_recall.append(float(np.isin(cats[np.isin(ids, truth)], chosen).mean()))
            near = set(chosen)
            for label, fn in routed.items():
                timed(label, fn, (ql, q, chosen, near), truth)
            top = [c.category_id for c in ranked[:FIXED_FAN_OUT]]
            for label, fn in fixed.items():
                timed(label, fn, (ql, q, top, set(top)), truth)
            # Explicit filter: 3 random categories, unrelated to the query. As in the service, the
            # categories stage 1 would have picked count as near, the others as far.
            for label, fn in filtered.items():
                timed(label, fn, (ql, q, filters[i], near), ftruths[i])
    methods = {label: summarise(lat[label], rec[label], rows[label]) for label in lat}
    return {
        "methods": methods,
        "stage1": {
            "categories": args.fan_out,
            "mean_categories": round(float(np.mean(stage1_count)), 2),
            "category_recall": round(float(np.mean(stage1_recall)), 4),
            "p50_ms": round(statistics.median(stage1_ms), 3),
        },
        "queries": len(queries),
    }


def _ground_truth(
    queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, cats: np.ndarray, filters: list[list[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Every query's true top k, unfiltered and within its filter, computed before any timing: NumPy's BLAS
    threads keep spinning after a large product and, on 2 cores, slowed the timed searches beside them
    (FAISS p50 0.19 -> 2.5 ms in a side test)."""
    truths: list[list[int]] = []
    ftruths: list[list[int]] = []
    for start in range(0, len(queries), 20):
        block = vectors @ queries[start : start + 20].T  # (n, 20)
        for j in range(block.shape[1]):
            scores = block[:, j]
            truths.append(ids[np.argsort(-scores, kind="stable")[:K]].tolist())
            masked = np.where(np.isin(cats, filters[start + j]), scores, -np.inf)
            ftruths.append(ids[np.argsort(-masked, kind="stable")[:K]].tolist())
    return truths, ftruths


def _calibrate(
    db: Database,
    model: Any,
    settings: Settings,
    queries: np.ndarray,
    vectors: np.ndarray,
    ids: np.ndarray,
    cats: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One category at a time: exact branch vs HNSW branch (decides search_exact_max_rows)."""
    calib = sorted(np.unique(cats).tolist())[:3]
    lat: dict[str, list[float]] = {"exact": [], "hnsw": []}
    recall: list[float] = []
    with db.session() as session:
        nb = NeighbourRepository(session)
        had = nb.category_indexes(model.id)
        ensure_calibration_indexes(session, model.id, args.dim, [c for c in calib if c not in had])
        members = {c: (ids[cats == c], vectors[cats == c]) for c in calib}
        truths = [
            members[c][0][np.argsort(-(members[c][1] @ q), kind="stable")[:K]].tolist()
            for c, q in ((calib[i % len(calib)], q) for i, q in enumerate(queries))
        ]
        for i, q in enumerate(queries):
            c = calib[i % len(calib)]
            truth = truths[i]
            # Mostly queries from other categories, so the HNSW branch walks at the far width (1000).
            ef = category_ef_search(len(members[c][0]), settings.search_ef_search, near=False)
            pair = calibration_pair(nb, model.id, args.dim, vector_literal(q), c, K, ef)
            for label in lat:
                lat[label].append(pair[label][0])
            recall.append(len(set(pair["hnsw"][1]) & set(truth)) / len(truth))
        session.rollback()  # the calibration indexes were only for this measurement
    return {
        "rows_per_category": int(np.mean([(cats == c).sum() for c in calib])),
        "exact_p50_ms": round(statistics.median(lat["exact"]), 3),
        "hnsw_p50_ms": round(statistics.median(lat["hnsw"]), 3),
        "hnsw_recall_at_10": round(float(np.mean(recall)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--million", action="store_true", help="also 1,000,000 rows (long: index builds)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm relative to the centre (1.0)")
    parser.add_argument(
        "--intrinsic-dim",
        type=int,
        default=0,
        help="noise in a random r-dim subspace per category (0 = isotropic, the hard case)",
    )
    parser.add_argument(
        "--fan-out",
        default="default",
        help="stage-1 categories: a number, or 'default' (score mass, at most --max-categories)",
    )
    parser.add_argument("--max-categories", type=int, default=Settings.model_fields["search_categories"].default)
    parser.add_argument("--score-mass", type=float, default=Settings.model_fields["search_score_mass"].default)
    parser.add_argument("--ef-search", type=int, default=Settings.model_fields["search_ef_search"].default)
    parser.add_argument("--exact-max-rows", type=int, default=Settings.model_fields["search_exact_max_rows"].default)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("IMSRC_BENCH_DATABASE_URL"),
        help="server to create scratch databases on (default: an embedded one)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the benchmark databases (and the embedded server's data directory)"
    )
    parser.add_argument(
        "--reuse",
        metavar="DATABASE",
        help="measure on a database kept by --keep (one size; same data flags) instead of loading",
    )
    parser.add_argument(
        "--reuse-build", metavar="JSON", help="with --reuse: the results file whose build times to carry over"
    )
    parser.add_argument(
        "--shared-buffers",
        default="6GB",
        help="shared_buffers for the embedded benchmark server ('' = leave the default)",
    )
    parser.add_argument(
        "--no-partitions", dest="partitions", action="store_false", help="skip the LIST-partitioned comparison table"
    )
    parser.add_argument("--no-report", action="store_true", help="do not redraw latency.png")
    parser.add_argument(
        "--parallel-builds",
        action="store_true",
        help="build the global HNSW and the per-category ones at the same time (2 sessions)",
    )
    parser.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="skip pg_prewarm of the table and its indexes before measuring",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="merge into the existing results.json (sizes measured now replace the same sizes)",
    )
    parser.add_argument("--out", default="results.json", help="results file name under bench/search")
    parser.add_argument("--report-only", action="store_true", help="only redraw the plot from results.json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((OUT / "results.json").read_text())
        plot(saved, OUT / "latency.png")
        return
    sizes = args.sizes + ([1_000_000] if args.million else [])
    scratch = ROOT / "bench" / "results" / "tmp" / "search"
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": {k: v for k, v in vars(args).items() if k != "database_url"},
        "sizes": [],
    }
    server = None
    url = args.database_url
    if not url:
        server, url = start_server(scratch / "server", args.shared_buffers)
    with psycopg.connect(url) as conn:
        results["server"] = {"shared_buffers": conn.execute("SHOW shared_buffers").fetchone()[0]}  # type: ignore[index]
    try:
        for n in sizes:
            print(f"--- {n} rows", flush=True)
            res = run_size(url, n, args, scratch)
            results["sizes"].append(res)
            if args.append and (OUT / args.out).exists():
                previous = json.loads((OUT / args.out).read_text())
                keep = [p for p in previous.get("sizes", []) if p["rows"] not in {r["rows"] for r in results["sizes"]}]
                results["sizes"] = sorted(keep + results["sizes"], key=lambda r: r["rows"])
                results["notes"] = previous.get("notes", [])
                args.append = False  # merged once; later sizes of this run are already in results
            for label, m in res["methods"].items():
                print(
                    f"{label:55s} p50 {m['p50_ms']:8.2f} ms  p95 {m['p95_ms']:8.2f} ms  "
                    f"recall {m['recall_at_10']:.3f}  rows {m['mean_rows']:.1f}",
                    flush=True,
                )
            print(f"stage 1: {res['stage1']}  build: {res['build_s']}  sizes: {res['sizes']}", flush=True)
            print(f"calibration: {res['calibration']}", flush=True)
            (OUT / args.out).write_text(json.dumps(results, indent=1))
    finally:
        if server is not None:
            server.stop()
            if not (args.keep or args.reuse):
                shutil.rmtree(scratch / "server", ignore_errors=True)
    if not args.no_report:
        plot(results, OUT / "latency.png")


if __name__ == "__main__":
    main()
