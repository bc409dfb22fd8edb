"""Memory of `imsrc serve --workers 1` and `--workers 2` over a large FAISS catalog (issue 16: 2 workers at 1M
vectors should cost at most 1.3x one).

    PYTHONPATH=backend python bench/load/run.py --memory 1000000          # or: python bench/load/memory.py --rows N

No images are decoded: a catalog of N synthetic unit vectors (a Gaussian mixture, 512-d like the default CLIP
model, equal categories) is loaded with binary COPY straight into `images` and `embeddings` of a fresh embedded
PostgreSQL, prototypes are computed, and the FAISS index the service uses is built and saved once, here. Then for
each worker count a server runs on that catalog (IMSRC_SEARCH_BACKEND=faiss, model `open_clip:ViT-B-32:none`, the
default CLIP architecture with random weights: same size, no download); every worker warms up (its model, its
mapped index, one search) and answers searches by image; then every worker answers `similar` searches in mode
`ann` (all categories, k 100) until it has touched nearly all of the mapped FAISS pages, the steady state of a
server that has answered many queries. Each process's /proc/PID/smaps_rollup is read then: RSS counts every
shared page (mapped FAISS files, the page cache) once per process that maps it; PSS divides each shared page
between those processes, so the PSS sum is what the server really costs. /proc/PID/smaps gives the FAISS files'
share of each. PostgreSQL is not counted (its own processes, the same for both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT), str(ROOT / "bench"), str(Path(__file__).resolve().parent)]

from bench.search.load import bulk_load, copy_rows, make_mixture  # noqa: E402
from bench_common import machine, process_tree, replace_section, write_json  # noqa: E402

MODEL = "open_clip:ViT-B-32:none"
DIMENSION = 512
ANN_ALL = {"mode": "ann", "k": 100}
INSERT_CATEGORY = "INSERT INTO categories (name) VALUES (:n) RETURNING id"
PREPARE = (
    "from imsrc.config import get_settings\n"
    "from imsrc.embeddings.loading import load_embedder\n"
    "print(load_embedder(get_settings().model, get_settings()))"
)
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of one process (all its mappings summed by the kernel)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0].rstrip(":") in FIELDS:
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def mapped(pid: int, folder: str) -> dict[str, int]:
    """Rss and Pss (kB) of the mappings of files under `folder` in one process, and the files' mapped size."""
    out = {"Rss": 0, "Pss": 0, "Size": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].strip().startswith(folder)
            elif inside and head[0].rstrip(":") in out:
                out[head[0].rstrip(":")] += int(head[1])
    return out


def libraries(pid: int) -> dict[str, bool]:
    """Whether torch's and ONNX Runtime's shared libraries are mapped in the process (a worker whose towers all
    run on ONNX Runtime loads no torch: embeddings.direct)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {}
    return {"libtorch": "libtorch" in maps, "onnxruntime": "onnxruntime" in maps}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


def build_catalog(scratch: Path, rows: int, categories: int) -> tuple[str, dict[str, float]]:
    """Embedded PostgreSQL under scratch/server with N vectors of MODEL; the FAISS index saved under
    scratch/data/faiss. Returns the database URL and timings."""
    from imsrc.catalog.repository import ModelRepository
    from imsrc.db.embedded import EmbeddedServer
    from imsrc.db.engine import make_engine, upgrade
    from imsrc.db.session import Database
    from imsrc.search.faiss_store import FaissStore
    from imsrc.search.sync import sync_search

    timings: dict[str, float] = {}
    url = EmbeddedServer(scratch / "server").start().url()
    upgrade(url)
    settings = settings_for(url, scratch)
    db = Database(url=url, engine=make_engine(url), settings=settings, revision="head", pgvector_version="")
    with db.session() as session:
        models = ModelRepository(session)
        model = models.register(name=MODEL, dimension=DIMENSION, family="open_clip", params={}, supports_text=True)
        models.set_active(model)
        # The catalog-wide HNSW graph over 1M rows would take hours here and FAISS does not use it.
        session.execute(text(f"DROP INDEX IF EXISTS ix_embeddings_hnsw_m{model.id}"))
        cat_ids = [
            int(session.execute(text(INSERT_CATEGORY), {"n": f"mem-{i:03d}"}).scalar_one()) for i in range(categories)
        ]
        model_id = int(model.id)
    started = time.perf_counter()
    mixture = make_mixture(categories, DIMENSION, 1.0, seed=16)
    rng = np.random.default_rng(16)
    chunk = 50_000
    with bulk_load(url) as conn:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            vectors, labels = mixture.sample(n, rng)
            ids = np.arange(start + 1, start + n + 1, dtype=np.int64)
            copy_rows(conn, model_id, ids, np.asarray(cat_ids, dtype=np.int64)[labels], vectors)
    timings["copy_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    with db.session() as session:
        sync_search(session, settings, model_id=model_id, autogroup_images=False)
    timings["prototypes_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    with db.session() as session:
        model = ModelRepository(session).by_name(MODEL)
        assert model is not None
        store = FaissStore(settings.resolved_data_dir, flat_max_rows=settings.faiss_flat_max_rows)
        store.get(session, model)  # builds, saves under data/faiss, maps the saved files
    timings["faiss_build_s"] = round(time.perf_counter() - started, 1)
    db.engine.dispose()
    return url, timings


def settings_for(url: str, scratch: Path) -> Any:
    from imsrc.config import Settings

    return Settings(  # type: ignore[call-arg]
        database_url=url,
        data_dir=scratch / "data",
        model=MODEL,
        search_backend="faiss",
        search_exact_max_rows=10**9,  # no per-category HNSW graphs either: FAISS answers
        _env_file=None,
    )


def serve_env(url: str, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    env.update(
        IMSRC_DATABASE_URL=url,
        IMSRC_DATA_DIR=str(scratch / "data"),
        IMSRC_MODEL=MODEL,
        IMSRC_SEARCH_BACKEND="faiss",
        IMSRC_SEARCH_EXACT_MAX_ROWS=str(10**9),
        PYTHONPATH=str(ROOT / "backend"),
    )
    return env


def fresh_get(base: str, path: str, **params: Any) -> httpx.Response:
    """On a new connection each time, so the kernel may hand it to any worker."""
    with httpx.Client(base_url=base, timeout=300) as c:
        return c.get(path, params=params)


async def burst(base: str, requests: list[tuple[str, str, dict[str, Any]]], concurrency: int) -> list[int]:
    """Requests on `concurrency` parallel fresh connections; the status codes."""
    sem = asyncio.Semaphore(concurrency)

    async def one(method: str, path: str, kw: dict[str, Any]) -> int:
        async with sem, httpx.AsyncClient(base_url=base, timeout=300) as c:
            return (await c.request(method, path, **kw)).status_code

    return await asyncio.gather(*(one(m, p, kw) for m, p, kw in requests))


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def measure(workers: int, url: str, scratch: Path, rows: int, port: int) -> dict[str, Any]:
    from run import picture

    faiss_dir = str((scratch / "data" / "faiss").resolve())
    total_kb = sum(p.stat().st_size for p in Path(faiss_dir).rglob("*.faiss")) // 1024
    log = open(scratch / f"serve-{workers}.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env=serve_env(url, scratch),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            try:
                if fresh_get(base, "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > 600:
                raise SystemExit(f"server did not start; see {scratch / f'serve-{workers}.log'}")
            time.sleep(0.5)
        # Every worker warms itself (model, mapped index, one search); wait until 20 answers in a row say so.
        streak = 0
        while streak < 20:
            ready = fresh_get(base, "/health/ready").json()
            streak = streak + 1 if ready.get("search_warm") else 0
            if time.perf_counter() - started > 1200:
                raise SystemExit("warm-up did not finish in 20 min")
            time.sleep(0.1 if streak else 1.0)
        warm_s = time.perf_counter() - started
        pids = process_tree(proc.pid)
        workers_pids = [p for p in pids if "multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p)]
        if workers == 1:
            workers_pids = [proc.pid]
        before = {p: cpu_ticks(p) for p in workers_pids}
        searches = [
            ("POST", "/api/search/image", {"files": {"file": ("q.jpg", picture(i), "image/jpeg")}})
            for i in range(8 * workers)
        ]
        codes = asyncio.run(burst(base, searches, 4))
        served = {p: cpu_ticks(p) - before[p] for p in workers_pids}
        after_search = {p: {**smaps_rollup(p), "faiss": mapped(p, faiss_dir)} for p in pids}
        # Touch the mapped index the way many queries would: `ann` over every category, k 100 (each query
        # re-ranks k x 40 candidates in every category), until every worker has nearly all of it resident.
        ids = np.random.default_rng(0).integers(1, rows + 1, 400).tolist()
        rounds = 0
        while rounds < 40:
            resident = {p: mapped(p, faiss_dir)["Rss"] for p in workers_pids}
            if min(resident.values()) >= 0.9 * total_kb:
                break
            rounds += 1
            batch = [
                ("GET", f"/api/search/similar/{ids[(rounds * 8 + j) % len(ids)]}", {"params": ANN_ALL})
                for j in range(4 * workers)
            ]
            codes += asyncio.run(burst(base, batch, 2 * workers))
        hot = {p: {**smaps_rollup(p), "faiss": mapped(p, faiss_dir)} for p in pids}
        libs = {p: libraries(p) for p in workers_pids}
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    def total(snapshot: dict[int, dict[str, Any]], key: str) -> float:
        return round(sum(v.get(key, 0) for v in snapshot.values()) / 1024, 1)

    return {
        "workers": workers,
        "warm_s": round(warm_s, 1),
        "status_codes": sorted(set(codes)),
        "worker_cpu_ticks_during_image_searches": {str(p): t for p, t in served.items()},
        "touch_rounds": rounds,
        "faiss_files_mb": round(total_kb / 1024, 1),
        "processes": {str(p): cmdline(p) for p in pids},
        "after_image_searches": {
            "rss_mb": total(after_search, "Rss"),
            "pss_mb": total(after_search, "Pss"),
            "per_process": {str(p): v for p, v in after_search.items()},
        },
        "hot": {
            "rss_mb": total(hot, "Rss"),
            "pss_mb": total(hot, "Pss"),
            "pss_anon_mb": total(hot, "Pss_Anon"),
            "pss_file_mb": total(hot, "Pss_File"),
            "faiss_rss_mb": round(sum(v["faiss"]["Rss"] for v in hot.values()) / 1024, 1),
            "faiss_pss_mb": round(sum(v["faiss"]["Pss"] for v in hot.values()) / 1024, 1),
            "per_process": {str(p): v for p, v in hot.items()},
            # What each worker holds alone (its private pages: heap, model sessions, PQ codes; not the shared
            # FAISS file pages), the part a second worker adds.
            "worker_private_mb": {
                str(p): round((hot[p].get("Private_Clean", 0) + hot[p].get("Private_Dirty", 0)) / 1024, 1)
                for p in workers_pids
            },
        },
        "worker_libraries": {str(p): v for p, v in libs.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--keep", type=Path, help="scratch folder to reuse (catalog and index built once)")
    parser.add_argument("--build-only", action="store_true", help="build the catalog and index into --keep, stop")
    parser.add_argument("--section", default="Load: memory of 1 vs 2 workers over a large FAISS catalog")
    args = parser.parse_args(argv)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="imsrc-mem-"))
    scratch.mkdir(parents=True, exist_ok=True)
    from imsrc.db.embedded import EmbeddedServer

    server = EmbeddedServer(scratch / "server")
    timings: dict[str, float] = {}
    try:
        if (scratch / "built").exists():
            url = server.start().url()
        else:
            url, timings = build_catalog(scratch, args.rows, args.categories)
            (scratch / "built").write_text(str(timings))
        print(f"catalog ready in {scratch}: {timings}", flush=True)
        if args.build_only:
            return
        # The model once, before the runs, as a server's first start loads it: it makes (or finds) the ONNX
        # exports and records them, so every measured worker starts from the recorded exports (embeddings.direct:
        # an all-ONNX worker then imports no torch), whichever run comes first.
        subprocess.run([sys.executable, "-c", PREPARE], cwd=ROOT, env=serve_env(url, scratch), check=True, timeout=3600)
        load_before = os.getloadavg()
        runs = []
        for i, w in enumerate(int(x) for x in args.workers.split(",")):
            runs.append(measure(w, url, scratch, args.rows, 18_700 + i))
            print({k: runs[-1][k] for k in ("workers", "warm_s", "status_codes", "hot")}, flush=True)
        load_after = os.getloadavg()
    finally:
        server.stop()
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    base = runs[0]
    result = {
        "machine": machine(),
        "rows": args.rows,
        "categories": args.categories,
        "dimension": DIMENSION,
        "model": MODEL,
        "build": timings,
        "load_before": load_before,
        "load_after": load_after,
        "runs": runs,
        "ratios": {
            f"{r['workers']}_vs_{base['workers']}": {
                stage: {
                    "rss": round(r[stage]["rss_mb"] / base[stage]["rss_mb"], 2),
                    "pss": round(r[stage]["pss_mb"] / base[stage]["pss_mb"], 2),
                }
                for stage in ("after_image_searches", "hot")
            }
            for r in runs[1:]
        },
    }
    write_json(Path(__file__).with_name("memory.json"), result)
    lines = [
        f"`PYTHONPATH=backend python bench/load/run.py --memory {args.rows} --categories {args.categories}` ("
        f"{DIMENSION}-d synthetic vectors loaded by COPY, model {MODEL}, IMSRC_SEARCH_BACKEND=faiss; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after). Server = the serve process and "
        "every process below it (uvicorn's supervisor and workers); PostgreSQL not counted. 'Hot': after `ann` "
        "searches over every category made each worker touch >= 90 % of the mapped FAISS files.",
        "",
        "| workers | when | RSS MB | PSS MB | FAISS files RSS / PSS MB | PSS anon MB | private MB per worker "
        "| RSS ratio | PSS ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        for stage, label in (("after_image_searches", "warm, after image searches"), ("hot", "hot")):
            s = r[stage]
            faiss_rss = round(sum(v["faiss"]["Rss"] for v in s["per_process"].values()) / 1024, 1)
            faiss_pss = round(sum(v["faiss"]["Pss"] for v in s["per_process"].values()) / 1024, 1)
            anon = round(sum(v.get("Pss_Anon", 0) for v in s["per_process"].values()) / 1024, 1)
            private = " / ".join(str(v) for v in s.get("worker_private_mb", {}).values()) or "-"
            lines.append(
                f"| {r['workers']} | {label} | {s['rss_mb']} | {s['pss_mb']} | {faiss_rss} / {faiss_pss} | {anon} | "
                f"{private} | {s['rss_mb'] / base[stage]['rss_mb']:.2f}x | {s['pss_mb'] / base[stage]['pss_mb']:.2f}x |"
            )
    torch_in = sorted({str(v.get("libtorch")) for r in runs for v in r.get("worker_libraries", {}).values()})
    lines += ["", f"libtorch mapped in the workers (hot): {', '.join(torch_in)}."]
    replace_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
