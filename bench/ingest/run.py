"""Ingest throughput: end-to-end images/s of `imsrc index` against the model's own batch throughput.

Run: PYTHONPATH=backend python bench/ingest/run.py [--images 10000] [--models efficientnet-lite0,ViT-B-32]
Writes bench/ingest/results.json and the "## Ingest throughput" section of BENCHMARKS.md.

The folder is Fashion-MNIST's test split written out as JPEG files (one folder per class), indexed with
--category-from-folder into a fresh database on an embedded PostgreSQL. ViT-B-32 runs with random weights
(no download here): speed does not depend on the weights. The model's own throughput is measured on the
same images, already preprocessed, right before and right after the end-to-end run (mean of the two),
so both figures see the same machine load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import torch
from PIL import Image
from sqlalchemy.engine import make_url

from imsrc.config import Settings
from imsrc.db.embedded import EmbeddedServer
from imsrc.db.engine import make_engine, upgrade
from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.registry import build_embedder
from imsrc.ingest import decode
from imsrc.ingest.demo import load_fashion_mnist
from imsrc.ingest.pipeline import resolve_workers, run_index_job

ROOT = Path(__file__).resolve().parents[2]
TMP = ROOT / "bench" / "results" / "tmp" / "ingest"
RESULTS = Path(__file__).resolve().parent / "results.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADING = "## Ingest throughput"
MODELS = {"efficientnet-lite0": ("efficientnet-lite0", "ImageNet (PyPI)"),
          "ViT-B-32": ("open_clip:ViT-B-32:none", "random init, speed only")}


def prepare_folder(n: int) -> Path:
    folder = TMP / f"fashion-mnist-jpeg-{n}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data = load_fashion_mnist(TMP / "download")
    for i in range(n):
        label = data.classes[int(data.labels[i])].replace("/", "-")
        path = folder / label / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i]).save(path, "JPEG", quality=90)
    marker.write_text(str(n))
    return folder


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jpg"))


def worker_stage_ms(files: list[Path], embedder: Embedder, n: int = 300) -> dict[str, float]:
    """Per-image cost of each worker step, one process, median over n files (ms)."""
    steps: dict[str, list[float]] = {k: [] for k in ("read_hash", "decode", "phash", "thumbnail", "preprocess")}
    for path in files[:n]:
        t0 = time.perf_counter()
        data, _, _ = decode.read_file(str(path))
        hashlib.sha256(data).digest()
        t1 = time.perf_counter()
        img = decode.open_image(data, 10**8)
        rgb = decode.model_image(img)
        t2 = time.perf_counter()
        decode.phash64(rgb)
        t3 = time.perf_counter()
        decode.make_thumbnail(img, 256)
        t4 = time.perf_counter()
        embedder.preprocess(rgb)
        t5 = time.perf_counter()
        for key, a, b in (("read_hash", t0, t1), ("decode", t1, t2), ("phash", t2, t3), ("thumbnail", t3, t4),
                          ("preprocess", t4, t5)):
            steps[key].append((b - a) * 1000)
    out = {k: round(statistics.median(v), 3) for k, v in steps.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def model_throughput(embedder: Embedder, files: list[Path], batch_size: int, batches: int) -> float:
    """images/s of encode_images alone on preprocessed batches of the same images (median batch time)."""
    tensors = [embedder.preprocess(decode.model_image(decode.open_image(p.read_bytes(), 10**8)))
               for p in files[: batch_size * 2]]
    stack = torch.stack([torch.as_tensor(t) for t in tensors])
    batch_list = [stack[:batch_size], stack[batch_size:]]
    embedder.encode_images(batch_list[0])  # warm-up
    times = []
    for i in range(batches):
        t0 = time.perf_counter()
        embedder.encode_images(batch_list[i % 2])
        times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def fresh_database(server_url: str) -> str:
    name = f"bench_ingest_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def run_model(label: str, server_url: str, folder: Path, batch_size: int, workers: int,
              model_batches: int) -> dict[str, Any]:
    name, weights = MODELS[label]
    embedder = build_embedder(name, precision="fp32")
    files = files_of(folder)
    before = model_throughput(embedder, files, batch_size, model_batches)
    url = fresh_database(server_url)
    db = Database(url=url, engine=make_engine(url, pool_size=4),
                  settings=Settings(database_url=url, _env_file=None), revision="head")  # type: ignore[call-arg]
    try:
        summary = run_index_job(db, embedder, [str(folder)], category_from_folder=True, workers=workers,
                                batch_size=batch_size)
    finally:
        db.dispose()
    after = model_throughput(embedder, files, batch_size, model_batches)
    model_ips = (before + after) / 2
    processed = sum(summary.run_counts.values())
    e2e = processed / summary.seconds
    return {
        "model": label, "registered_as": name, "weights": weights, "batch_size": batch_size, "workers": workers,
        "images": processed, "counts": summary.run_counts, "seconds": summary.seconds,
        "end_to_end_img_s": round(e2e, 2), "model_img_s_before": round(before, 2),
        "model_img_s_after": round(after, 2), "model_img_s": round(model_ips, 2),
        "ratio": round(e2e / model_ips, 3), "pipeline_stage_s": summary.stage_seconds,
        # Share of the wall time the model was computing: under 1.0 only where it waited for input or output.
        "model_busy": round(summary.stage_seconds["embed"] / summary.seconds, 3),
        "worker_stage_ms": worker_stage_ms(files, embedder),
    }


def write_markdown(res: dict[str, Any]) -> None:
    lines = [HEADING, "",
             f"`bench/ingest/run.py` on {res['machine']}: `imsrc index` of {res['images']} Fashion-MNIST test images "
             f"written as JPEG (28x28, one folder per class, `--category-from-folder`) into a fresh database, "
             f"batch {res['batch_size']}, {res['workers']} worker processes, fp32. End-to-end = files / job wall time "
             "(scan, decode, pHash, thumbnail, preprocess, embed, COPY + HNSW insert, prototypes). Model = "
             "`encode_images` alone on preprocessed batches of the same images, measured just before and just "
             "after the run (mean). Model busy = share of the wall time the embedding thread was computing "
             "(1.0 = never starved). Shared 2-core VM, other engineers' jobs running: compare ratios, not digits.", "",
             "| model | weights | end-to-end img/s | model img/s (before / after) | ratio | model busy | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['model']} | {r['weights']} | {r['end_to_end_img_s']} | {r['model_img_s']} "
                     f"({r['model_img_s_before']} / {r['model_img_s_after']}) | {r['ratio']:.2f} | "
                     f"{r['model_busy']:.2f} | "
                     f"{'met' if r['ratio'] >= 0.9 else 'missed'} (>= 0.90) |")
    lines += ["", "Where the time went (seconds, summed per stage; stages overlap, so they add up to more than "
              "the wall time; `wait_for_workers` is the main thread waiting on decoded images):", "",
              "| model | wall | embed | write | wait_for_workers | scan_and_lookup |", "|---|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        s = r["pipeline_stage_s"]
        lines.append(f"| {r['model']} | {r['seconds']} | {s['embed']} | {s['write']} | {s['wait_for_workers']} | "
                     f"{s['scan_and_lookup']} |")
    lines += ["", "Per-image worker cost (ms, median of 300 files, one process):", "",
              "| model | read+sha256 | decode | pHash | thumbnail | preprocess | total |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        w = r["worker_stage_ms"]
        lines.append(f"| {r['model']} | {w['read_hash']} | {w['decode']} | {w['phash']} | {w['thumbnail']} | "
                     f"{w['preprocess']} | {w['total']} |")
    lines.append("")
    section = "\n".join(lines) + "\n"
    old = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if HEADING in old:
        before, rest = old.split(HEADING, 1)
        nxt = rest.find("\n## ")
        new = before + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000, help="JPEG files to index (max 10,000)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="0 = one per CPU")
    ap.add_argument("--model-batches", type=int, default=8, help="timed batches for the model-only figure")
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args()
    started = time.monotonic()
    folder = prepare_folder(min(args.images, 10_000))
    server = EmbeddedServer(TMP / "data")
    info = server.start()
    workers = resolve_workers(args.workers)
    runs = []
    try:
        for label in args.models.split(","):
            print(f"{label}: indexing {args.images} files ...", flush=True)
            r = run_model(label, info.url("postgres"), folder, args.batch_size, workers, args.model_batches)
            print(json.dumps(r), flush=True)
            runs.append(r)
    finally:
        server.stop()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "images": min(args.images, 10_000), "batch_size": args.batch_size, "workers": workers, "runs": runs,
           "elapsed_s": round(time.monotonic() - started, 1)}
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_markdown:
        write_markdown(res)
    print(f"wrote {RESULTS.relative_to(ROOT)}" + ("" if args.no_markdown else f" and {BENCHMARKS.name}"))


if __name__ == "__main__":
    main()
