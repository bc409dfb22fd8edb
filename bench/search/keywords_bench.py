"""Keyword search over captions at scale: keywords alone, keywords filter (vectors rank) and keywords boost,
through SearchService (what the API runs per request) and through SQL (imsrc.search_text), interleaved.

    PYTHONPATH=backend python bench/search/keywords_bench.py --rows 100000

Starts its own embedded PostgreSQL, loads a synthetic catalog (bench/search/load.py: Gaussian mixture, binary
COPY, every index), gives every image a caption of 6-12 words drawn from a 5,000-word Zipf vocabulary (so some
words are in most captions and most words in few), and measures k=10 queries for a common word (about 1 caption
in 10), a rare word (about 1 in 2,000), and two words together. Filter and boost rank by a catalog image's vector
(the image itself is not excluded: a vector query). Writes bench/search/results/keywords-<rows>.json.
Not a test: it prints and writes figures; the machine it runs on may be shared (the load average is recorded).
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

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.bench_common import database_url  # noqa: E402
from bench.search.load import load, make_mixture, prewarm  # noqa: E402

from imsrc.catalog.repository import vector_literal  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.db.embedded import EmbeddedServer  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.schemas import SearchOptions  # noqa: E402
from imsrc.search.service import SearchRuntime  # noqa: E402

K = 10
VOCABULARY = 5000
RESULTS = Path(__file__).resolve().parent / "results"


def captions(rows: int, rng: np.random.Generator) -> list[str]:
    """Zipf-distributed words named w0..w4999 (w0 the most common)."""
    ranks = np.arange(1, VOCABULARY + 1)
    p = 1.0 / ranks
    p /= p.sum()
    lengths = rng.integers(6, 13, rows)
    words = rng.choice(VOCABULARY, size=int(lengths.sum()), p=p)
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(f"w{w}" for w in words[at : at + n]))
        at += n
    return out


def word_with_share(texts: list[str], share: float) -> str:
    """The word whose caption share is nearest `share`."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in set(t.split()):
            counts[w] = counts.get(w, 0) + 1
    return min(counts, key=lambda w: abs(counts[w] / len(texts) - share))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    scratch = ROOT / "bench" / "results" / "tmp" / f"keywords-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    mixture = make_mixture(args.categories, args.dim, 0.8, seed=1)
    vectors, labels = mixture.sample(args.rows, np.random.default_rng(2))
    server = EmbeddedServer(scratch / "server")
    url = server.start().url("postgres")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "imsrc_bench"')
        db_url = database_url(url, "imsrc_bench")
        upgrade(db_url)
        # Categories of up to 2,000 rows are scanned exactly (no per-category HNSW builds: at 100k they took 16
        # minutes on the loaded shared machine, and keyword search does not use them; boost's vector part does).
        settings = Settings(database_url=db_url, data_dir=scratch / "data", search_exact_max_rows=2000, _env_file=None)  # type: ignore[call-arg]
        engine = make_engine(db_url)
        db = Database(url=db_url, engine=engine, settings=settings, revision="head", pgvector_version="")
        _model, build, ids, _cats = load(
            db, settings, vectors, labels, int(labels.max()) + 1, model_name="bench-synthetic"
        )
        texts = captions(args.rows, rng)
        started = time.perf_counter()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE c (id bigint, caption text)")
            with conn.cursor().copy("COPY c (id, caption) FROM STDIN") as copy:
                for i, t in zip(ids.tolist(), texts, strict=True):
                    copy.write_row((i, t))
            conn.execute("UPDATE images i SET caption = c.caption FROM c WHERE c.id = i.id")
            conn.execute("VACUUM ANALYZE images")
        build["captions_s"] = time.perf_counter() - started
        prewarm(db)
        common, rare = word_with_share(texts, 0.1), word_with_share(texts, 0.0005)
        queries = {"common word": common, "rare word": rare, "two words": f"{common} {word_with_share(texts, 0.2)}"}
        runtime = SearchRuntime.create(settings.model_copy(update={"search_backend": "pgvector"}))
        picks = rng.choice(len(ids), args.queries, replace=False)
        lat: dict[str, list[float]] = {}
        matches: dict[str, int] = {}
        with db.session() as session, psycopg.connect(db_url) as conn:
            service = runtime.service(session)
            model = service.model(None)
            conn.read_only = True
            for label, words in queries.items():
                matches[label] = int(
                    conn.execute(
                        "SELECT count(*) FROM images WHERE to_tsvector('english', coalesce(caption, ''))"
                        " @@ websearch_to_tsquery('english', %s)",
                        (words,),
                    ).fetchone()[0]
                )  # type: ignore[index]
            for n, row in enumerate(picks):
                vector = vectors[row]
                literal = vector_literal(vector)
                for label, words in queries.items():
                    for how in ("alone", "filter", "boost"):
                        options = SearchOptions(
                            k=K,
                            keywords=None if how == "alone" else words,
                            keyword_mode="boost" if how == "boost" else "filter",
                        )
                        t = time.perf_counter()
                        if how == "alone":
                            service.search_keywords(words, options)
                        else:
                            service.search_vector(model, vector, options)
                        service_ms = (time.perf_counter() - t) * 1000
                        t = time.perf_counter()
                        if how == "alone":
                            conn.execute("SELECT * FROM imsrc.search_text(%s, %s)", (words, K)).fetchall()
                        else:
                            conn.execute(
                                "SELECT * FROM imsrc.search_text(%s, %s, %s::vector, %s)", (words, K, literal, how)
                            ).fetchall()
                        sql_ms = (time.perf_counter() - t) * 1000
                        if n == 0:
                            continue  # the first round warms caches and plans
                        lat.setdefault(f"{label} | {how} | service", []).append(service_ms)
                        lat.setdefault(f"{label} | {how} | sql", []).append(sql_ms)
                conn.rollback()
        engine.dispose()
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    rows = {
        key: {"p50_ms": round(statistics.median(v), 2), "p95_ms": round(pct(v, 95), 2), "n": len(v)}
        for key, v in lat.items()
    }
    return {
        "command": " ".join(["python", "bench/search/keywords_bench.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "data": {"rows": args.rows, "dim": args.dim, "categories": args.categories, "vocabulary": VOCABULARY},
        "settings": {"search_exact_max_rows": 2000, "search_backend": "pgvector"},
        "queries": queries,
        "matching_captions": matches,
        "k": K,
        "build_s": {k: round(v, 2) for k, v in build.items()},
        "latency": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"keywords-{args.rows}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("queries", "matching_captions", "machine")}, indent=2))
    for key, row in result["latency"].items():
        print(f"{key:40s} p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
