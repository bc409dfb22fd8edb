"""Index build benchmark: the per-category HNSW indexes (as search sync builds them) against the per-model
HNSW index over the whole catalog, on synthetic 512-d vectors in equal categories.

    PYTHONPATH=backend python bench/search/build_bench.py [--rows 100000] [--categories 100]

Times, in one process against one server, on one freshly loaded catalog:
- `global (service)`: the per-model index as the service builds it (ModelRepository.ensure_index: pgvector's
  default graph, m 16 / ef_construction 64);
- `global (m 32, ef_construction 80)`: the same index with the per-category graphs' density (a fair baseline);
- `per-category (sync)`: every category's index through search sync (ensure_category_indexes), m 32 /
  ef_construction 80, which is what a catalog pays after a bulk load;
- a breakdown on a few categories: one index rebuilt alone, and what the statement reads besides its own rows
  (a scan of the rows the index holds, and a scan of the whole embeddings table).
Figures are also given per million catalog rows. Builds run with the server's own maintenance settings (those the
service gets) unless --maintenance-work-mem is given. Writes bench/search/results/index_builds/build-ROWS.json.
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
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.bench_common import check_resources, database_url  # noqa: E402
from bench.search.load import load, make_mixture, start_server  # noqa: E402

from imsrc.catalog.repository import GLOBAL_OPCLASS, ModelRepository, embedding_expr  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.pg_queries import HNSW_EF_CONSTRUCTION, HNSW_M, NeighbourRepository  # noqa: E402
from imsrc.search.sync import ensure_category_indexes  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "index_builds"
SERVER_SETTINGS = ("shared_buffers", "maintenance_work_mem", "max_parallel_maintenance_workers", "server_version")


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(url: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    name = f"imsrc_build_{args.rows}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = database_url(url, name)
    try:
        upgrade(db_url)
        settings = Settings(
            database_url=db_url,
            data_dir=scratch / name,
            _env_file=None,  # type: ignore[call-arg]
            search_exact_max_rows=args.exact_max_rows,
        )
        engine = make_engine(db_url)
        db = Database(url=db_url, engine=engine, settings=settings, revision="head", pgvector_version="")
        mixture = make_mixture(args.categories, args.dim, 0.6, seed=1)
        vectors, labels = mixture.sample(args.rows, np.random.default_rng(2))
        model, loaded, _, cats = load(db, settings, vectors, labels, args.categories, indexes=False)
        out: dict[str, Any] = {"rows": args.rows, "categories": args.categories, "dim": args.dim}
        out["copy_s"] = round(loaded["copy_s"], 2)
        with db.session() as session:
            out["server"] = {
                s: session.execute(text(f"SHOW {s}")).scalar_one() for s in SERVER_SETTINGS
            }  # before any SET LOCAL
            out["structure"] = (
                "category_vectors partitions (0013)"
                if session.execute(text("SELECT to_regclass('category_vectors')")).scalar()
                else "partial indexes on embeddings"
            )
            out["embeddings_table_bytes"] = int(
                session.execute(text("SELECT pg_total_relation_size('embeddings')")).scalar_one()
            )
        out["load_average_before"] = _load_average()
        dim = args.dim
        builds: dict[str, float] = {}

        def maintenance(session: Any) -> None:
            if args.maintenance_work_mem:
                session.execute(text(f"SET LOCAL maintenance_work_mem = '{args.maintenance_work_mem}'"))

        with db.session() as session:
            maintenance(session)
            builds["global (service)"] = _timed(lambda: ModelRepository(session).ensure_index(model))
        if not args.skip_dense_global:
            with db.session() as session:
                maintenance(session)
                builds[f"global (m {HNSW_M}, ef_construction {HNSW_EF_CONSTRUCTION})"] = _timed(
                    lambda: session.execute(
                        text(
                            f"CREATE INDEX bench_global_dense ON embeddings USING hnsw "
                            f"({embedding_expr(dim)} {GLOBAL_OPCLASS}) WITH (m = {HNSW_M}, "
                            f"ef_construction = {HNSW_EF_CONSTRUCTION}) WHERE model_id = {model.id}"
                        )
                    )
                )
                session.execute(text("DROP INDEX bench_global_dense"))
        made: list[int] = []
        with db.session() as session:
            maintenance(session)
            started = time.perf_counter()
            made, _ = ensure_category_indexes(session, settings, model)
            builds["per-category (sync)"] = time.perf_counter() - started
        out["per_category_indexes"] = len(made)
        out["builds_s"] = {k: round(v, 2) for k, v in builds.items()}
        out["builds_s_per_million_rows"] = {k: round(v * 1e6 / args.rows, 1) for k, v in builds.items()}
        glob = builds["global (service)"]
        out["per_category_vs_global"] = round(builds["per-category (sync)"] / glob, 2)
        if args.breakdown and made:
            out["breakdown"] = breakdown(db, model.id, dim, made[: args.breakdown], maintenance)
        out["load_average_after"] = _load_average()
        out["categories_seen"] = len(np.unique(cats))
        engine.dispose()
        return out
    finally:
        if not args.keep:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def breakdown(db: Database, model_id: int, dim: int, categories: list[int], maintenance: Any) -> dict[str, float]:
    """Where one category's build goes: the index alone (rebuilt), the scan that feeds it (its own rows, via
    the planner's best plan), and a full sequential scan of the embeddings table (what CREATE INDEX reads when
    the rows share one heap with every other category)."""
    rebuild: list[float] = []
    rebuild_serial: list[float] = []
    own_rows: list[float] = []
    full: list[float] = []
    for c in categories:
        with db.session() as session:
            maintenance(session)
            rebuild.append(_rebuild(NeighbourRepository(session), model_id, dim, c))
        with db.session() as session:
            maintenance(session)
            session.execute(text("SET LOCAL max_parallel_maintenance_workers = 0"))
            rebuild_serial.append(_rebuild(NeighbourRepository(session), model_id, dim, c))
        with db.session() as session:
            own = text(
                f"SELECT sum(vector_dims(embedding)) FROM embeddings WHERE model_id = {model_id} AND category_id = {c}"
            )
            started = time.perf_counter()
            session.execute(own).scalar()
            own_rows.append(time.perf_counter() - started)
            session.execute(text("SET LOCAL enable_indexscan = off"))
            session.execute(text("SET LOCAL enable_bitmapscan = off"))
            session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
            full.append(
                _timed(lambda: session.execute(text("SELECT count(*) FROM ONLY embeddings WHERE true")).scalar())
                if args_full_scan_possible(session)
                else 0.0
            )
    med = statistics.median
    return {
        "categories": len(categories),
        "one_index_s": round(med(rebuild), 3),
        "one_index_serial_s": round(med(rebuild_serial), 3),
        "read_own_rows_s": round(med(own_rows), 3),
        "full_table_scan_s": round(med(full), 3),
    }


def _rebuild(nb: NeighbourRepository, model_id: int, dim: int, category_id: int) -> float:
    """Drop one category's index and build it again; seconds for the build."""
    nb.drop_category_index(model_id, category_id)
    started = time.perf_counter()
    nb.create_category_index(model_id, dim, category_id)
    return time.perf_counter() - started


def args_full_scan_possible(session: Any) -> bool:
    """embeddings is a plain table (ONLY embeddings is its whole heap). The scan is what a partial index on it
    reads per category; since 0013 a build reads its partition instead, and the figure shows what that saves."""
    return session.execute(text("SELECT relkind FROM pg_class WHERE oid = 'embeddings'::regclass")).scalar() == "r"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--database-url", help="server to create a scratch database on (default: an embedded one)")
    parser.add_argument("--shared-buffers", default="1GB", help="for the embedded server ('' = its default)")
    parser.add_argument("--maintenance-work-mem", default="", help="SET LOCAL for every build ('' = server's)")
    parser.add_argument(
        "--exact-max-rows", type=int, default=500, help="IMSRC_SEARCH_EXACT_MAX_ROWS: smallest indexed category"
    )
    parser.add_argument("--breakdown", type=int, default=3, metavar="N", help="categories to break down (0 = none)")
    parser.add_argument("--skip-dense-global", action="store_true", help="skip the m 32 global baseline")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--out", default="", help="results file (default results/index_builds/build-ROWS.json)")
    args = parser.parse_args()
    if args.rows < args.categories or args.categories < 1:
        raise SystemExit("build_bench: --rows must be at least --categories, and --categories at least 1")
    scratch = ROOT / "bench" / "results" / "tmp" / "build"
    # Memory: heap + two graphs, roughly (MemAvailable: free memory alone refused runs on a machine whose memory
    # sat in reclaimable page cache); disk: the same three, twice over for the halfvec copy and WAL.
    need = args.rows * (args.dim * 4 + 64) * 3
    check_resources("build_bench", memory=need, disk=2 * need, folder=scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    server = None
    url = args.database_url
    if not url:
        server, url = start_server(scratch / "server", args.shared_buffers)
    try:
        result = measure(url, args, scratch)
    finally:
        if server is not None:
            server.stop()
            if not args.keep:
                shutil.rmtree(scratch / "server", ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    result["command"] = "python bench/search/build_bench.py " + " ".join(sys.argv[1:])
    for label, s in result["builds_s"].items():
        print(f"{label:45s} {s:8.2f} s   {result['builds_s_per_million_rows'][label]:8.1f} s per million rows")
    print(f"per-category / global (service): {result['per_category_vs_global']}x ({result['structure']})")
    if "breakdown" in result:
        print(f"breakdown (median of {result['breakdown']['categories']}): {result['breakdown']}")
    print(f"load average before {result['load_average_before']} after {result['load_average_after']}")
    path = Path(args.out) if args.out else OUT / f"build-{args.rows}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
