"""Load test: N concurrent clients for T seconds mixing searches and uploads against a live server on loopback.

Reports zero-5xx, that every acknowledged upload is present afterwards, and p50/p95/p99 latency per route.
Usage: python bench/load/run.py [--clients 50] [--seconds 60] [--model efficientnet-lite0] [--workers 1,2] [--url URL]
         [--backend pgvector|faiss] [--upload-categories N]
Without --url it starts `imsrc serve --workers N` on a fresh data directory for each N in --workers, one after the
other, and seeds it with images first; the table has one block of rows per worker count. While the clients run it
samples the server's memory (the supervisor and its workers together) every second: RSS, which counts pages that
processes share (the page cache of memory-mapped FAISS files, the model's weights after fork) once per process,
and PSS, which splits each shared page between the processes that map it (the memory the workers really cost).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine, process_tree, replace_section, write_json

# Cumulative shares: uploads below the first, searches by image below the second, text searches (when the model
# has a text tower) below the third, listing below the fourth, `similar` above it. "issue": issue 16's mix, 70 %
# searches (45 by image, 25 similar), 20 % listing, 10 % uploads.
MIXES: dict[str, tuple[float, float, float, float]] = {
    "default": (0.25, 0.6, 0.8, 0.9),
    "issue": (0.10, 0.55, 0.55, 0.75),
}


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


QUERY_PICTURES = 200
UPLOADS_AHEAD = 30  # pictures made per client before the clock starts; more are made on the fly


class Pictures:
    """The request bodies, made before the timed run: a picture costs the load generator ~3-6 ms of CPU (numpy +
    JPEG), ~0.2 cores at 50 requests/s, taken from the 2 cores the server is measured on."""

    def __init__(self, clients: int, uploads_ahead: int = UPLOADS_AHEAD) -> None:
        self.queries = [picture(i) for i in range(QUERY_PICTURES)]
        self.uploads = {(c, k): picture(c * 100_000 + k) for c in range(1, clients + 1) for k in range(uploads_ahead)}

    def upload(self, client: int, k: int) -> bytes:
        """The k-th upload of a client: unique across clients and uploads, so none is a duplicate."""
        data = self.uploads.pop((client, k), None)
        return data if data is not None else picture(client * 100_000 + k)


def start_server(
    model: str, workers: int, backend: str, extra_env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    data = Path(tempfile.mkdtemp(prefix="imsrc-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    env.update(IMSRC_DATA_DIR=str(data / "data"), IMSRC_MODEL=model, IMSRC_SEARCH_BACKEND=backend)
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if log is None else log.open("ab"),
    )
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


async def client_loop(
    client: httpx.AsyncClient,
    deadline: float,
    seed: int,
    stats: dict[str, list[float]],
    errors: dict[str, int],
    uploaded: list[int],
    texts_ok: bool,
    categories: int,
    mix: tuple[float, float, float, float] = (0.25, 0.6, 0.8, 0.9),
    stages: dict[str, list[float]] | None = None,
    pictures: Pictures | None = None,
    server_ms: dict[str, list[float]] | None = None,
) -> None:
    rng = random.Random(seed)
    n = uploads = 0
    upload_to, image_to, text_to, listing_to = mix
    while time.monotonic() < deadline:
        n += 1
        roll = rng.random()
        t0 = time.perf_counter()
        route = "?"
        try:
            if roll < upload_to:
                route = "POST /api/images"
                data = pictures.upload(seed, uploads) if pictures is not None else picture(seed * 100_000 + n)
                uploads += 1
                form = {"category": f"load-{seed % categories}"} if categories else {}
                resp = await client.post(
                    "/api/images", data=form, files={"file": (f"load-{seed}-{n}.jpg", data, "image/jpeg")}
                )
                if stages is not None:
                    for name, ms in server_timing(resp.headers.get("server-timing", "")).items():
                        stages[name].append(ms)
                if resp.status_code < 300:
                    for item in resp.json().get("results", []):
                        if item.get("id"):
                            uploaded.append(int(item["id"]))
            elif roll < image_to:
                route = "POST /api/search/image"
                resp = await client.post(
                    "/api/search/image",
                    params={"k": 10},
                    files={"file": ("q.jpg", query_picture(pictures, rng.randrange(QUERY_PICTURES)), "image/jpeg")},
                )
            elif roll < text_to and texts_ok:
                route = "GET /api/search/text"
                resp = await client.get("/api/search/text", params={"q": rng.choice(["a red circle", "blue", "shoe"])})
            elif roll < listing_to:
                route = "GET /api/images"
                resp = await client.get("/api/images", params={"page": rng.randint(1, 3)})
            else:
                route = "GET /api/search/similar"
                ids = uploaded or [1]
                resp = await client.get(f"/api/search/similar/{rng.choice(ids)}")
        except httpx.TransportError:
            # The connection failed under the request (closed by the server, reset): no answer, so neither a
            # status nor an acknowledged upload; counted apart from 5xx.
            errors[f"dropped:{route}"] += 1
            continue
        stats[route].append((time.perf_counter() - t0) * 1000)
        app = server_timing(resp.headers.get("server-timing", "")).get("app")
        if server_ms is not None and app is not None:
            server_ms[route].append(app)
        if resp.status_code >= 500:
            errors[route] += 1


def query_picture(pictures: Pictures | None, i: int) -> bytes:
    return pictures.queries[i] if pictures is not None else picture(i)


def server_timing(header: str) -> dict[str, float]:
    """`name;dur=12.3, other;dur=4` -> {name: 12.3, other: 4.0} (the upload route's stage times)."""
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if name and rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                continue
    return out


def stage_summary(stages: dict[str, list[float]], uploads: int) -> dict[str, dict[str, float]]:
    """Per stage: p50 over the uploads that had it, and mean over all uploads (0 where it did not occur)."""
    return {
        name: {
            "uploads": len(values),
            "p50_ms": round(statistics.median(values), 1),
            "mean_ms": round(sum(values) / max(1, uploads), 1),
        }
        for name, values in stages.items()
    }


async def loop_lag(deadline: float, lags: list[float], every: float = 0.05) -> None:
    """How late this load generator's event loop wakes up (ms): time a request waits here, not in the server."""
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        await asyncio.sleep(every)
        lags.append((time.perf_counter() - t0 - every) * 1000)


async def status_of(client: httpx.AsyncClient, path: str) -> int:
    """A GET's status; a connection the server closed while idle (keep-alive timeout) is retried."""
    for attempt in range(3):
        try:
            return (await client.get(path)).status_code
        except httpx.TransportError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def run(
    base: str, clients: int, seconds: float, categories: int, mix: str = "default", pictures: Pictures | None = None
) -> dict[str, object]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        status = (await client.get("/api/status")).json()
        texts_ok = any(m.get("is_active") and m.get("supports_text") for m in status.get("models", []))
        stats: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, int] = defaultdict(int)
        uploaded: list[int] = []
        stages: dict[str, list[float]] = defaultdict(list)
        server_ms: dict[str, list[float]] = defaultdict(list)
        deadline = time.monotonic() + seconds
        lags: list[float] = []
        await asyncio.gather(
            loop_lag(deadline, lags),
            *(
                client_loop(
                    client,
                    deadline,
                    i + 1,
                    stats,
                    errors,
                    uploaded,
                    texts_ok,
                    categories,
                    MIXES[mix],
                    stages,
                    pictures,
                    server_ms,
                )
                for i in range(clients)
            ),
        )
        missing = [i for i in uploaded if await status_of(client, f"/api/images/{i}") != 200]
    routes = {}
    for route, values in sorted(stats.items()):
        q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
        routes[route] = {
            "requests": len(values),
            "p50_ms": round(q[49], 1),
            "p95_ms": round(q[94], 1),
            "p99_ms": round(q[98], 1),
            "5xx": errors.get(route, 0),
            "dropped": errors.get(f"dropped:{route}", 0),
            # in the server's app (Server-Timing "app"): the rest is the server's accept and HTTP parsing, its event
            # loop before the app, and this load generator's own delays
            "server_p50_ms": round(statistics.median(server_ms[route]), 1) if server_ms.get(route) else None,
        }
    return {
        "clients": clients,
        "seconds": seconds,
        "routes": routes,
        "acknowledged_uploads": len(uploaded),
        "missing_uploads": len(missing),
        "total_5xx": sum(v for k, v in errors.items() if not k.startswith("dropped:")),
        "dropped_connections": sum(v for k, v in errors.items() if k.startswith("dropped:")),
        "upload_stages": stage_summary(stages, len(stats.get("POST /api/images", []))),
        "load_generator_lag_ms": {
            "p50": round(statistics.median(lags), 1) if lags else None,
            "p95": round(statistics.quantiles(lags, n=20)[18], 1) if len(lags) > 1 else None,
        },
    }


class MemorySampler:
    """Peak and last RSS and PSS (MB) of a process and its children, sampled every second in a thread."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.root = psutil.Process(pid)
        self.peak = {"rss_mb": 0.0, "pss_mb": 0.0}
        self.last = dict(self.peak)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, float]:
        import psutil

        rss = pss = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return {"rss_mb": round(rss / 2**20, 1), "pss_mb": round(pss / 2**20, 1)}

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            self.last = self.sample()
            self.peak = {k: max(self.peak[k], v) for k, v in self.last.items()}

    def close(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join(5)
        return {
            "peak_rss_mb": self.peak["rss_mb"],
            "peak_pss_mb": self.peak["pss_mb"],
            "end_rss_mb": self.last["rss_mb"],
            "end_pss_mb": self.last["pss_mb"],
        }


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime of the process (all its threads)
    except (OSError, IndexError, ValueError):
        return 0


def _postmaster(data: Path) -> int | None:
    """The embedded PostgreSQL of this run (its postmaster.pid under the data directory)."""
    for pid_file in data.rglob("postmaster.pid"):
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuSampler:
    """CPU used during the run by: the server (serve process and its workers), this run's PostgreSQL (postmaster
    and its backends), this load generator, and everything else on the machine; in cores (CPU seconds per
    second). Shows whether one worker left CPU idle (then a second can gain) or the machine was saturated."""

    def __init__(self, server: int, data: Path) -> None:
        self.groups = {"server": process_tree(server), "load generator": [os.getpid()]}
        postmaster = _postmaster(data)
        self.server, self.postmaster = server, postmaster
        self.start = time.monotonic()
        self.before = self._snapshot()
        self.machine = _machine_ticks()

    def _snapshot(self) -> dict[str, dict[int, int]]:
        groups = {"server": process_tree(self.server), "load generator": [os.getpid()]}
        if self.postmaster is not None:
            groups["postgres"] = process_tree(self.postmaster)
        return {name: {p: _ticks(p) for p in pids} for name, pids in groups.items()}

    def close(self) -> dict[str, object]:
        after = self._snapshot()
        wall = time.monotonic() - self.start
        hz = os.sysconf("SC_CLK_TCK")
        busy0, total0 = self.machine
        busy1, total1 = _machine_ticks()
        cpus = os.cpu_count() or 1
        used: dict[str, float] = {}
        for name, pids in after.items():
            # Backends that started during the run count from 0; ones that ended are missed (a few, short).
            ticks = sum(t - self.before.get(name, {}).get(p, 0) for p, t in pids.items())
            used[name] = round(ticks / hz / wall, 2)
        machine_busy = round((busy1 - busy0) / max(1, total1 - total0) * cpus, 2)
        used["everything else"] = round(max(0.0, machine_busy - sum(used.values())), 2)
        return {"cores": cpus, "machine_busy_cores": machine_busy, "busy_cores_by": used, "seconds": round(wall, 1)}


def wait_warm(base: str, timeout: float = 900) -> None:
    """Until 20 answers of /health/ready in a row, on fresh connections (any worker), say the search warm-up
    (model, indexes, one search) is done, so no worker loads its model inside the timed run."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 20 and time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=base, timeout=30) as c:
                warm = c.get("/health/ready").json().get("search_warm")
        except (httpx.HTTPError, ValueError):
            warm = False
        streak = streak + 1 if warm in (True, None) else 0
        time.sleep(0.05 if streak else 1.0)


def measure(args: argparse.Namespace, workers: int | None) -> dict[str, object]:
    proc = data = None
    base = args.url
    if base is None:
        assert workers is not None
        extra = dict(args.server_env)
        proc, base, data = start_server(args.model, workers, args.backend, extra, args.server_log)
        with httpx.Client(base_url=base, timeout=300) as c:
            for start in range(0, args.seed_images, 20):
                files = [
                    ("file", (f"seed-{i}.jpg", picture(i), "image/jpeg"))
                    for i in range(start, min(start + 20, args.seed_images))
                ]
                c.post("/api/images", files=files).raise_for_status()
        wait_warm(base)
    pictures = Pictures(args.clients)  # before the clock and the CPU samplers start
    load_before = os.getloadavg()[0]
    sampler = MemorySampler(proc.pid) if proc is not None else None
    cpu = CpuSampler(proc.pid, data) if proc is not None and data is not None else None
    try:
        result = asyncio.run(run(base, args.clients, args.seconds, args.upload_categories, args.mix, pictures))
        if cpu is not None:
            result["cpu"] = cpu.close()
        if sampler is not None:
            result["memory"] = sampler.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
            subprocess.run(
                [sys.executable, "-m", "imsrc.cli.main", "db", "stop"],
                cwd=ROOT,
                check=False,
                env={**os.environ, "IMSRC_DATA_DIR": str(data / "data")},
                capture_output=True,
            )  # type: ignore[operator]
            shutil.rmtree(data, ignore_errors=True)  # type: ignore[arg-type]
    result.update(workers=workers, load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    return result


def env_setting(item: str) -> tuple[str, str]:
    """--server-env NAME=VALUE, refused with one line (argparse) otherwise."""
    name, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME an environment variable name, got {item!r}")
    return name, value


def reading(runs: list[dict[str, Any]], seconds: float) -> list[str]:
    """Issue 16's targets, met or missed, from a run with 1 and 2 workers: search throughput 2 vs 1 >= 1.6x (and
    the most this machine allows: cores / cores busy with 1 worker, since a second worker can only use what one
    left idle), upload p50 <= 1 s, 0 5xx, 0 lost acknowledged uploads."""
    by = {r["workers"]: r for r in runs}
    if 1 not in by or 2 not in by:
        return []

    def searches(r: dict[str, Any]) -> float:
        return sum(v["requests"] for k, v in r["routes"].items() if "/search/" in k) / seconds

    def met(ok: bool) -> str:
        return "met" if ok else "missed"

    one, two = by[1], by[2]
    ratio = searches(two) / max(searches(one), 1e-9)
    cpu = one.get("cpu") or {}
    busy, cores = cpu.get("machine_busy_cores"), cpu.get("cores")
    ceiling = f"{cores / busy:.2f}x" if busy and cores else "?"
    uploads = {w: r["routes"].get("POST /api/images", {}).get("p50_ms") for w, r in by.items()}
    bad = {w: (r["total_5xx"], r["missing_uploads"], r.get("dropped_connections", 0)) for w, r in by.items()}
    return [
        "",
        "Against issue 16's targets (computed by the script from the tables above):",
        f"- search throughput, 2 workers vs 1: {searches(two):.1f} / {searches(one):.1f} searches/s = **{ratio:.2f}x**"
        f" (target >= 1.6x: {met(ratio >= 1.6)}). With 1 worker the machine was {busy} of its {cores} cores busy,"
        f" so a second worker could add at most the idle rest: ceiling here {cores} / {busy} = {ceiling}.",
        *(
            f"- upload p50 under load, {w} worker(s): {uploads[w]} ms (target <= 1000 ms: "
            f"{met(uploads[w] is not None and uploads[w] <= 1000)})"
            for w in sorted(by)
        ),
        *(
            f"- {w} worker(s): {b[0]} 5xx, {b[1]} acknowledged uploads missing, {b[2]} dropped connections "
            f"(target 0, 0: {met(b == (0, 0, 0))})"
            for w, b in sorted(bad.items())
        ),
    ]


def main() -> None:
    if "--memory" in sys.argv:  # the memory mode has its own options (bench/load/memory.py)
        import memory

        at = sys.argv.index("--memory")
        memory.main(["--rows", sys.argv[at + 1], *sys.argv[1:at], *sys.argv[at + 2 :]])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--seed-images", type=int, default=100)
    parser.add_argument("--workers", default="1,2", help="API worker counts to run one after the other")
    parser.add_argument("--url", help="an already running server (no seeding; --workers ignored)")
    parser.add_argument("--section", default="Load (concurrent clients)", help="BENCHMARKS.md section to write")
    parser.add_argument(
        "--backend",
        default="pgvector",
        choices=["pgvector", "faiss"],
        help="IMSRC_SEARCH_BACKEND of the started servers (faiss: indexes saved once and mapped)",
    )
    parser.add_argument(
        "--upload-categories",
        type=int,
        default=0,
        help="uploads go into this many named categories (client i into load-{i mod N}); 0: none",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        type=env_setting,
        metavar="NAME=VALUE",
        help="a setting for the started servers (repeatable), e.g. IMSRC_SEARCH_CONCURRENCY=0",
    )
    parser.add_argument("--server-log", type=Path, help="append the started servers' stderr to this file")
    parser.add_argument(
        "--no-write", action="store_true", help="print only: leave results.json and BENCHMARKS.md alone (exploring)"
    )
    parser.add_argument("--mix", default="default", choices=sorted(MIXES), help="request mix (see MIXES)")
    args = parser.parse_args()
    counts: list[int | None] = [None] if args.url else [int(w) for w in args.workers.split(",")]
    runs = [measure(args, w) for w in counts]
    result = {
        "machine": machine(),
        "model": args.model,
        "clients": args.clients,
        "seconds": args.seconds,
        "backend": args.backend,
        "upload_categories": args.upload_categories,
        "mix": args.mix,
        "runs": runs,
    }
    if not args.no_write:
        write_json(Path(__file__).with_name("results.json"), result)
    lines = [
        f"{args.clients} concurrent clients for {args.seconds:.0f} s on loopback per run, model {args.model}, "
        f"{machine()['cpus']} CPUs; one run per `imsrc serve --workers N`, one after the other.",
        f"Command: `python bench/load/run.py --clients {args.clients} --seconds {args.seconds:g} "
        f"--model {args.model} --seed-images {args.seed_images} --workers {args.workers} "
        f"--backend {args.backend} --upload-categories {args.upload_categories} --mix {args.mix}`.",
        "",
        "| workers | load avg before/after | 5xx | dropped connections | acknowledged uploads | missing | searches/s |"
        " upload p50 ms | peak RSS MB | peak PSS MB |"
        " busy cores: machine / server / postgres / load generator / others |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        routes = r["routes"]
        searches = sum(v["requests"] for k, v in routes.items() if "/search/" in k)  # type: ignore[attr-defined]
        upload = routes.get("POST /api/images", {}).get("p50_ms", "-")  # type: ignore[attr-defined]
        memory = r.get("memory") or {}
        cpu = r.get("cpu") or {}
        by = cpu.get("busy_cores_by", {})  # type: ignore[attr-defined]
        cores = (
            f"{cpu['machine_busy_cores']} of {cpu['cores']} / {by.get('server')} / {by.get('postgres')} / "
            f"{by.get('load generator')} / {by.get('everything else')}"
            if cpu
            else "-"
        )
        lines.append(
            f"| {r['workers'] or '-'} | {r['load_before']} / {r['load_after']} | {r['total_5xx']} | "
            f"{r.get('dropped_connections', 0)} | "
            f"{r['acknowledged_uploads']} | {r['missing_uploads']} | {searches / args.seconds:.1f} | "
            f"{upload} | {memory.get('peak_rss_mb', '-')} | {memory.get('peak_pss_mb', '-')} | {cores} |"
        )
    lines += [
        "",
        "| workers | route | requests | p50 ms | p95 ms | p99 ms | 5xx | p50 ms in the server's app |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        for route, v in r["routes"].items():  # type: ignore[attr-defined]
            lines.append(
                f"| {r['workers'] or '-'} | {route} | {v['requests']} | {v['p50_ms']} | {v['p95_ms']} | "
                f"{v['p99_ms']} | {v['5xx']} | {v.get('server_p50_ms') or '-'} |"
            )
    lines += [
        "",
        "Load generator's own event-loop lag (how late a 50 ms sleep wakes; a request waits that long in the load"
        " generator, not in the server): "
        + "; ".join(
            f"{r['workers'] or '-'} worker(s): p50 {r['load_generator_lag_ms']['p50']} ms, "  # type: ignore[index]
            f"p95 {r['load_generator_lag_ms']['p95']} ms"  # type: ignore[index]
            for r in runs
            if r.get("load_generator_lag_ms")
        ),
    ]
    lines += reading(runs, args.seconds)
    names = list(dict.fromkeys(n for r in runs for n in r.get("upload_stages", {})))  # type: ignore[attr-defined]
    if names:
        lines += [
            "",
            "Where an upload's time went (the route's Server-Timing header; p50 over the uploads that had the stage,"
            " mean over all uploads; decode includes decode_wait and thumbnail, write and sync include their lock_*"
            " waits, route is everything from the request's arrival at the route to its answer, queue the wait for"
            " a threadpool thread):",
            "",
            "| workers | " + " | ".join(names) + " |",
            "| ---: | " + " | ".join("---:" for _ in names) + " |",
        ]
        for r in runs:
            st = r.get("upload_stages", {})
            cells = [
                f"{st[n]['p50_ms']} / {st[n]['mean_ms']}" if n in st else "-"  # type: ignore[index,operator]
                for n in names
            ]
            lines.append(f"| {r['workers'] or '-'} | " + " | ".join(cells) + " |")
    if not args.no_write:
        replace_section(args.section, "\n".join(lines))
    print("\n".join(lines))
    if any(r["total_5xx"] or r["missing_uploads"] or r.get("dropped_connections") for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
