"""Paired A/B of two checkouts' search code on one Citus catalog (coordinator + 2 workers on this machine).

    PYTHONPATH=backend:. .venv/bin/python bench/citus/ab.py --before /path/to/old/checkout [--after .]
        [--real-calibrated 50000] [--queries 200] [--repeats 3] [--modes vector,similar]

On a shared, loaded machine two runs of bench/citus/run.py minutes apart differ more than a change of a fraction of a
millisecond, so this measures a change the other way: one catalog (bench/citus/run.py's data: bench/search's
real-calibrated vectors, its queries, built and migrated by --after's code), and one server process per checkout,
each with its own SearchRuntime and connection pool, driven in lockstep: every query is asked of both, in random
order, one right after the other, so both meet the same load. Per mode (`vector`: SearchService.search_vector with the
query's own image left out, as bench/citus/run.py; `similar`: SearchService.similar of that image) and per stage-1
fan-out (1 and 3 categories): each side's p50, the paired median difference (after - before) with a 95 % bootstrap
interval, and how many answers were identical (ids, scores, categories, duplicate counts). Writes
bench/citus/ab-results.json. --before's code runs against a catalog at --after's migration head (it is not migrated
again): compare checkouts whose search path reads the same schema.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
K = 10


def serve(root: str, url: str, data: str, model_name: str) -> None:
    """One checkout's side: reads `mode query-index categories` lines, answers `[ms, results]` lines."""
    sys.path[:0] = [f"{root}/backend", root]
    import numpy as np

    from imsrc.catalog.repository import ModelRepository
    from imsrc.config import Settings
    from imsrc.db.engine import make_engine
    from imsrc.db.session import Database
    from imsrc.search.schemas import SearchOptions
    from imsrc.search.service import SearchRuntime

    settings = Settings(
        database_url=url,
        data_dir=Path(data),
        model=model_name,
        search_two_stage_min_rows=0,
        search_warmup=False,
        _env_file=None,
    )  # type: ignore[call-arg]
    db = Database(url=url, engine=make_engine(url, pool_size=16), settings=settings, revision="head")
    queries = np.load(Path(data) / "queries.npy")
    image_ids = json.loads((Path(data) / "exclude.json").read_text())
    with db.session() as session:
        model = ModelRepository(session).by_name(model_name)
        assert model is not None
        session.expunge(model)
    runtime = SearchRuntime.create(settings)
    print("ready", flush=True)
    for line in sys.stdin:
        mode, index, categories = line.split()
        i, options = int(index), SearchOptions(k=K, categories=int(categories))
        started = time.perf_counter()
        with db.session() as session:
            service = runtime.service(session)
            if mode == "vector":
                found = service.search_vector(model, queries[i], options, exclude=image_ids[i])
            else:
                found = service.similar(image_ids[i], options)
        ms = (time.perf_counter() - started) * 1000
        answer = [(h.id, h.score, h.category, h.duplicates) for h in found.results]
        print(json.dumps([ms, answer]), flush=True)
    db.dispose()


def _commit(root: str) -> str | None:
    done = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def bootstrap(diffs: list[float], rng: random.Random, rounds: int = 2000) -> tuple[float, float]:
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="checkout whose code is the baseline")
    parser.add_argument("--after", default=str(ROOT), help="checkout measured against it (default: this one)")
    parser.add_argument("--real-calibrated", type=int, default=50_000, metavar="ROWS")
    parser.add_argument("--real-base", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the queries")
    parser.add_argument("--modes", default="vector,similar")
    parser.add_argument("--out", default=str(ROOT / "bench" / "citus" / "ab-results.json"))
    parser.add_argument("--serve", nargs=4, metavar=("ROOT", "URL", "DATA", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]
    import numpy as np
    from bench.citus.run import MODEL, catalog, load, local_cluster, open_db, server_settings

    args.categories, args.rows, args.dimension = 0, 0, 0  # catalog() reads them for synthetic data only
    modes = args.modes.split(",")
    started = time.perf_counter()
    _data, vectors, labels, names, make_queries = catalog(args)
    scratch = Path(tempfile.mkdtemp(prefix="imsrc-bench-citus-ab-"))
    os.chmod(scratch, 0o755)
    report: dict[str, Any] = {
        "before": args.before,
        "after": args.after,
        "before_commit": _commit(args.before),
        "after_commit": _commit(args.after),
        "rows": len(vectors),
        "queries": args.queries,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
    }
    cluster = None
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        (scratch / "citus").mkdir()
        cluster, url = local_cluster(scratch / "citus")
        for node in cluster.nodes:
            server_settings(node.url())
        db = open_db(url, scratch / "data")
        _model, report["build"], ids = load(db, vectors, labels, names)
        db.dispose()
        queries, exclude, _truth = make_queries(ids)
        (scratch / "data").mkdir(exist_ok=True)
        np.save(scratch / "data" / "queries.npy", queries)
        (scratch / "data" / "exclude.json").write_text(json.dumps([int(e) for e in exclude if e is not None]))
        for side in ("before", "after"):
            root = str(Path(getattr(args, side)).resolve())
            servers[side] = subprocess.Popen(
                [sys.executable, __file__, "--before", "-", "--serve", root, url, str(scratch / "data"), MODEL],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": f"{root}/backend:{root}"},
            )
        for process in servers.values():
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"

        def ask(side: str, mode: str, i: int, categories: int) -> list[Any]:
            process = servers[side]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(f"{mode} {i} {categories}\n")
            process.stdin.flush()
            return list(json.loads(process.stdout.readline()))

        rng = random.Random(3)
        for mode in modes:  # warm-up: caches, connections, the index pages
            for i in range(3):
                for side in servers:
                    ask(side, mode, i, 1)
                    ask(side, mode, i, 3)
        pairs: dict[str, list[tuple[float, float, bool]]] = {}
        for _ in range(args.repeats):
            for i in range(len(queries)):
                for mode in modes:
                    for categories in (1, 3):
                        order = ["before", "after"]
                        rng.shuffle(order)
                        got = {side: ask(side, mode, i, categories) for side in order}
                        pairs.setdefault(f"{mode}, {categories} categor{'y' if categories == 1 else 'ies'}", []).append(
                            (got["before"][0], got["after"][0], got["before"][1] == got["after"][1])
                        )
        report["load_average_after"] = os.getloadavg()
        report["results"] = {}
        for name, rows in pairs.items():
            diffs = [after - before for before, after, _ in rows]
            low, high = bootstrap(diffs, rng)
            report["results"][name] = {
                "before_p50_ms": round(statistics.median(r[0] for r in rows), 3),
                "after_p50_ms": round(statistics.median(r[1] for r in rows), 3),
                "paired_median_diff_ms": round(statistics.median(diffs), 3),
                "diff_95_ms": [round(low, 3), round(high, 3)],
                "identical": sum(r[2] for r in rows),
                "pairs": len(rows),
            }
        report["wall_s"] = round(time.perf_counter() - started, 1)
    finally:
        for process in servers.values():
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=60)
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["results"].items():
        print(
            f"{name}: before {r['before_p50_ms']:.2f} ms, after {r['after_p50_ms']:.2f} ms p50; paired median "
            f"{r['paired_median_diff_ms']:+.2f} ms (95% {r['diff_95_ms'][0]:+.2f}..{r['diff_95_ms'][1]:+.2f}); "
            f"identical {r['identical']}/{r['pairs']}"
        )
    print(f"load average {report['load_average_before']} before, {report['load_average_after']} after")


if __name__ == "__main__":
    main()
