"""Load test: N concurrent clients for T seconds mixing searches and uploads against a live server on loopback.

Reports zero-5xx, that every acknowledged upload is present afterwards, and p50/p95/p99 latency per route.
Usage: python bench/load/run.py [--clients 50] [--seconds 60] [--model efficientnet-lite0] [--workers 1,2] [--url URL]
Without --url it starts `imsrc serve --workers N` on a fresh data directory for each N in --workers, one after the
other, and seeds it with images first; the table has one block of rows per worker count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import ROOT, machine, replace_section, write_json


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(base[c] + x * rng.uniform(-2, 2) + y * rng.uniform(-2, 2)) % 256 for c in range(3)], -1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(6, 24)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_server(model: str, workers: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    data = Path(tempfile.mkdtemp(prefix="imsrc-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    env.update(IMSRC_DATA_DIR=str(data / "data"), IMSRC_MODEL=model)
    proc = subprocess.Popen([sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port),
                             "--workers", str(workers)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, data
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def client_loop(client: httpx.AsyncClient, deadline: float, seed: int, stats: dict[str, list[float]],
                      errors: dict[str, int], uploaded: list[int], texts_ok: bool) -> None:
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        roll = rng.random()
        t0 = time.perf_counter()
        if roll < 0.25:
            route = "POST /api/images"
            data = picture(seed * 100_000 + n)
            resp = await client.post("/api/images", files={"file": (f"load-{seed}-{n}.jpg", data, "image/jpeg")})
            if resp.status_code < 300:
                for item in resp.json().get("results", []):
                    if item.get("id"):
                        uploaded.append(int(item["id"]))
        elif roll < 0.6:
            route = "POST /api/search/image"
            resp = await client.post("/api/search/image", params={"k": 10},
                                     files={"file": ("q.jpg", picture(rng.randrange(200)), "image/jpeg")})
        elif roll < 0.8 and texts_ok:
            route = "GET /api/search/text"
            resp = await client.get("/api/search/text", params={"q": rng.choice(["a red circle", "blue", "shoe"])})
        elif roll < 0.9:
            route = "GET /api/images"
            resp = await client.get("/api/images", params={"page": rng.randint(1, 3)})
        else:
            route = "GET /api/search/similar"
            ids = uploaded or [1]
            resp = await client.get(f"/api/search/similar/{rng.choice(ids)}")
        stats[route].append((time.perf_counter() - t0) * 1000)
        if resp.status_code >= 500:
            errors[route] += 1


async def run(base: str, clients: int, seconds: float) -> dict[str, object]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        status = (await client.get("/api/status")).json()
        texts_ok = any(m.get("is_active") and m.get("supports_text") for m in status.get("models", []))
        stats: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, int] = defaultdict(int)
        uploaded: list[int] = []
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(client, deadline, i + 1, stats, errors, uploaded, texts_ok)
                               for i in range(clients)))
        missing = [i for i in uploaded if (await client.get(f"/api/images/{i}")).status_code != 200]
    routes = {}
    for route, values in sorted(stats.items()):
        q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
        routes[route] = {"requests": len(values), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1),
                         "p99_ms": round(q[98], 1), "5xx": errors.get(route, 0)}
    return {"clients": clients, "seconds": seconds, "routes": routes, "acknowledged_uploads": len(uploaded),
            "missing_uploads": len(missing), "total_5xx": sum(errors.values())}


def measure(args: argparse.Namespace, workers: int | None) -> dict[str, object]:
    proc = data = None
    base = args.url
    if base is None:
        assert workers is not None
        proc, base, data = start_server(args.model, workers)
        with httpx.Client(base_url=base, timeout=300) as c:
            for start in range(0, args.seed_images, 20):
                files = [("file", (f"seed-{i}.jpg", picture(i), "image/jpeg"))
                         for i in range(start, min(start + 20, args.seed_images))]
                c.post("/api/images", files=files).raise_for_status()
    load_before = os.getloadavg()[0]
    try:
        result = asyncio.run(run(base, args.clients, args.seconds))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
            subprocess.run([sys.executable, "-m", "imsrc.cli.main", "db", "stop"], cwd=ROOT, check=False,
                           env={**os.environ, "IMSRC_DATA_DIR": str(data / "data")}, capture_output=True)  # type: ignore[operator]
            shutil.rmtree(data, ignore_errors=True)  # type: ignore[arg-type]
    result.update(workers=workers, load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--seed-images", type=int, default=100)
    parser.add_argument("--workers", default="1,2", help="API worker counts to run one after the other")
    parser.add_argument("--url", help="an already running server (no seeding; --workers ignored)")
    args = parser.parse_args()
    counts: list[int | None] = [None] if args.url else [int(w) for w in args.workers.split(",")]
    runs = [measure(args, w) for w in counts]
    result = {"machine": machine(), "model": args.model, "clients": args.clients, "seconds": args.seconds,
              "runs": runs}
    write_json(Path(__file__).with_name("results.json"), result)
    lines = [f"{args.clients} concurrent clients for {args.seconds:.0f} s on loopback per run, model {args.model}, "
             f"{machine()['cpus']} CPUs; one run per `imsrc serve --workers N`, one after the other.",
             f"Command: `python bench/load/run.py --clients {args.clients} --seconds {args.seconds:g} "
             f"--model {args.model} --seed-images {args.seed_images} --workers {args.workers}`.", "",
             "| workers | load avg before/after | 5xx | acknowledged uploads | missing | searches/s |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        routes = r["routes"]
        searches = sum(v["requests"] for k, v in routes.items() if "/search/" in k)  # type: ignore[attr-defined]
        lines.append(f"| {r['workers'] or '-'} | {r['load_before']} / {r['load_after']} | {r['total_5xx']} | "
                     f"{r['acknowledged_uploads']} | {r['missing_uploads']} | {searches / args.seconds:.1f} |")
    lines += ["", "| workers | route | requests | p50 ms | p95 ms | p99 ms | 5xx |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        for route, v in r["routes"].items():  # type: ignore[attr-defined]
            lines.append(f"| {r['workers'] or '-'} | {route} | {v['requests']} | {v['p50_ms']} | {v['p95_ms']} | "
                         f"{v['p99_ms']} | {v['5xx']} |")
    replace_section("Load (concurrent clients)", "\n".join(lines))
    print("\n".join(lines))
    if any(r["total_5xx"] or r["missing_uploads"] for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
