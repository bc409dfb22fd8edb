"""Search as a user gets it: every timed row goes through SearchService (the object the API builds per request:
same k, duplicate margin, hydration, FAISS catch-up, stage 1 with its per-request version query), and a
second set of rows through HTTP against `imsrc serve` (`GET /api/search/similar/{id}`, and on real data
`POST /api/search/image` with the image, embedding included). Methods are interleaved query by query.

    PYTHONPATH=backend python bench/search/service_bench.py --synthetic 10000      # Gaussian mixture
    PYTHONPATH=backend python bench/search/service_bench.py --real 10000           # Fashion-MNIST, EfficientNet-Lite0

Each command starts its own embedded PostgreSQL, loads a fresh catalog (binary COPY), builds every index,
measures, and writes bench/search/results/<mode>-<rows>.json (what was measured, with that run's server
settings); `--report` rewrites the `## Search` section of BENCHMARKS.md from every results file present.
Queries are "more like this" on catalog images (the image itself excluded); truth is NumPy's exact top 10.

Baselines get the same graph as two-stage: the per-model HNSW index (mode `ann`) is built here with the
per-category indexes' m / ef_construction, and an extra `ann` row runs at the smallest hnsw.ef_search whose
recall@10 reaches two-stage pgvector's on a calibration set of separate queries.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.bench_common import check_resources, database_url, timed_phase  # noqa: E402
from bench.search.load import (  # noqa: E402
    calibrate_and_sync,
    load,
    make_mixture,
    real_calibrated,
    start_server,
)

from imsrc.catalog.models import EmbeddingModel  # noqa: E402
from imsrc.catalog.repository import ModelRepository  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.db.embedded import EmbeddedServer, resolve_shared_buffers  # noqa: E402
from imsrc.db.engine import make_engine, upgrade  # noqa: E402
from imsrc.db.session import Database  # noqa: E402
from imsrc.search.calibration import state_key  # noqa: E402
from imsrc.search.pg_queries import HNSW_EF_CONSTRUCTION, HNSW_M  # noqa: E402
from imsrc.search.repository import SearchStateRepository  # noqa: E402
from imsrc.search.schemas import SearchOptions, SearchResponse  # noqa: E402
from imsrc.search.service import SearchRuntime  # noqa: E402
from imsrc.search.sync import rebuild_legacy_graphs  # noqa: E402
from imsrc.search.walks import (  # noqa: E402
    ann_key,
)
from imsrc.search.walks import state_key as walks_key  # noqa: E402
from imsrc.search.warmup import prewarm_search_relations  # noqa: E402

K = 10
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# (row label, mode, backend); backend None = the service's default (pgvector)
T = TypeVar("T")
M = TypeVar("M", bound=tuple[Any, ...])  # a timed method: (label, mode, backend, ...)
METHODS = [
    ("exact", "exact", None),
    ("ann pgvector", "ann", "pgvector"),
    ("two_stage pgvector", "two_stage", "pgvector"),
    ("ann FAISS", "ann", "faiss"),
    ("two_stage FAISS", "two_stage", "faiss"),
]
FORCED = "two_stage pgvector, small-catalog rule off"
EF_LADDER = (40, 60, 100, 150, 200, 300, 400, 600, 1000)
SERVER_SETTINGS = (
    "shared_buffers",
    "work_mem",
    "max_parallel_workers_per_gather",
    "jit",
    "effective_cache_size",
    "plan_cache_mode",
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, round(q * (len(s) - 1)))], 3)


def summary(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(lat), 3), "p95_ms": pct(lat, 0.95), "p99_ms": pct(lat, 0.99)}


def truth_for(vectors: np.ndarray, ids: np.ndarray, query_rows: np.ndarray) -> list[list[int]]:
    """Exact top k by cosine, the query image itself left out (as `similar` does)."""
    out = []
    for start in range(0, len(query_rows), 50):
        block = vectors @ vectors[query_rows[start : start + 50]].T
        for j, row in enumerate(query_rows[start : start + 50]):
            scores = block[:, j].copy()
            scores[row] = -np.inf
            out.append(ids[np.argsort(-scores, kind="stable")[:K]].tolist())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Http:
    """`imsrc serve` on the benchmark database, in its own process (as users run it)."""

    def __init__(self, url: str, data_dir: Path, env: dict[str, str]) -> None:
        import httpx

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from imsrc.cli.main import main; main()", "serve", "--port", str(self.port)],
            env={
                **os.environ,
                **env,
                "IMSRC_DATABASE_URL": url,
                "IMSRC_DATA_DIR": str(data_dir),
                "PYTHONPATH": str(ROOT / "backend"),
            },
            stdout=subprocess.DEVNULL,
            stderr=(data_dir.parent / "serve.log").open("wb"),
        )  # a pipe nobody reads would fill and block it
        self.log = data_dir.parent / "serve.log"
        # Not 60 s: at 1M a warm-up request (not timed) took 75 s while the server's two workers pg_prewarmed a
        # catalog larger than shared_buffers, and the client's timeout ended an hour's run.
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        started = time.perf_counter()
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - started > 180:  # a loaded shared machine
                err = self.log.read_text(errors="replace").strip().splitlines()
                raise SystemExit(f"imsrc serve did not come up: {err[-1] if err else 'no output'}")
            time.sleep(0.2)
        self.health_s = time.perf_counter() - started

    def wait_warm(self, timeout_s: float = 900) -> float:
        """Seconds from start until /health/ready said the search warm-up was done on ten answers in a row, each
        on a new connection: each worker warms up on its own, and a kept-alive connection would ask one only."""
        import httpx

        started = time.perf_counter()
        in_a_row = 0
        while in_a_row < 10:
            if time.perf_counter() - started > timeout_s:
                raise SystemExit(f"the server's search warm-up did not finish within {timeout_s:.0f} s")
            if self.proc.poll() is not None:
                raise SystemExit(f"imsrc serve exited during its warm-up (see {self.log})")
            ready = f"http://127.0.0.1:{self.port}/health/ready"
            answer = httpx.get(ready, headers={"Connection": "close"}, timeout=60)
            warm = answer.json().get("search_warm")
            if warm is None:
                raise SystemExit("imsrc serve runs no search warm-up (IMSRC_SEARCH_WARMUP is off)")
            in_a_row = in_a_row + 1 if warm else 0
            time.sleep(0.05 if warm else 0.5)
        return self.health_s + time.perf_counter() - started

    def similar(self, image_id: int, mode: str, backend: str | None) -> tuple[float, dict[str, Any]]:
        params = {"k": K, "mode": mode, **({"backend": backend} if backend else {})}
        started = time.perf_counter()
        r = self.client.get(f"/api/search/similar/{image_id}", params=params)
        took = (time.perf_counter() - started) * 1000
        r.raise_for_status()
        return took, r.json()

    def image(self, png: bytes, mode: str, backend: str | None) -> tuple[float, dict[str, Any]]:
        params = {"k": K, "mode": mode, **({"backend": backend} if backend else {})}
        started = time.perf_counter()
        r = self.client.post("/api/search/image", params=params, files={"file": ("q.png", png, "image/png")})
        took = (time.perf_counter() - started) * 1000
        r.raise_for_status()
        return took, r.json()

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def service_call(
    db: Database, runtime: SearchRuntime, image_id: int, mode: str, backend: str | None, categories: int | None = None
) -> tuple[float, SearchResponse]:
    """One request's worth of work, as the API does it: a session (one transaction), the service, commit."""
    started = time.perf_counter()
    options = SearchOptions(k=K, mode=mode, backend=backend, categories=categories)  # type: ignore[arg-type]
    with db.session() as session:
        resp = runtime.service(session).similar(image_id, options)
    return (time.perf_counter() - started) * 1000, resp


# Stage-1 rules compared on the same queries (two_stage pgvector, small-catalog rule off): the rule of earlier
# releases (temperature fixed at 0.05, cut at the cap), the calibrated temperature cut at the cap, the calibrated
# rule with a query it cannot fit within the cap answered by `ann` (the default), or by the categories it wants
# (IMSRC_SEARCH_FALLBACK_CATEGORIES: up to 6, or all of them), and fixed fan-outs.
FALLBACK = Settings.model_fields["search_fallback_categories"].default


def _rules() -> list[tuple[str, float, int | None, bool, int]]:
    """(label, temperature, fan-out, fallback, IMSRC_SEARCH_FALLBACK_CATEGORIES); the default's label ends with
    "(default)" (service_report.default_rule)."""
    over_cap = [
        ("calibrated, ann over the cap", 0),
        ("calibrated, over the cap up to 6 categories, then ann", 6),
        ("calibrated, over the cap every category the rule wants", 1000),
    ]
    return [
        ("fixed temperature 0.05, cut at the cap", 0.05, None, False, FALLBACK),
        ("calibrated, cut at the cap", 0.0, None, False, FALLBACK),
        *((label + (" (default)" if most == FALLBACK else ""), 0.0, None, True, most) for label, most in over_cap),
        ("fan-out 1", 0.0, 1, True, FALLBACK),
        ("fan-out 2", 0.0, 2, True, FALLBACK),
        ("fan-out 3", 0.0, 3, True, FALLBACK),
    ]


RULES = _rules()


def measure_rules(
    db: Database,
    settings: Settings,
    ids: np.ndarray,
    rows: np.ndarray,
    truths: list[list[int]],
    cat_of: dict[int, int],
    label_of: dict[int, int],
) -> dict[str, Any]:
    """Label p@10, neighbour recall, stage-1 category recall and categories searched per rule, interleaved. A
    query answered by `ann` (the fallback) searched every category: category recall 1, all categories."""
    runtimes = {
        label: SearchRuntime.create(
            settings.model_copy(
                update={
                    "search_two_stage_min_rows": 0,
                    "search_stage1_temperature": temperature,
                    "search_stage1_fallback": fallback,
                    "search_fallback_categories": most,
                }
            )
        )
        for label, temperature, _, fallback, most in RULES
    }
    every = len(set(cat_of.values()))
    got: dict[str, dict[str, list[float]]] = {
        label: {"lat": [], "rec": [], "prec": [], "cat": [], "n": [], "ann": []} for label, *_ in RULES
    }
    for warm in rows[:5]:
        for label, _, fan, _, _ in RULES:
            service_call(db, runtimes[label], int(ids[warm]), "two_stage", "pgvector", fan)
    for i, r in enumerate(rows):
        qid = int(ids[r])
        for label, _, fan, _, _ in rotated(RULES, i):
            took, resp = service_call(db, runtimes[label], qid, "two_stage", "pgvector", fan)
            found = [h.id for h in resp.results]
            # The categories searched (stage 1's picks; a fill from the next ones would be listed too, but
            # every category here holds far more than k images); all of them when stage 1 fell back to ann.
            fell_back = resp.mode == "ann"
            picked = set(cat_of.values()) if fell_back else {c.category_id for c in resp.stage1}
            g = got[label]
            g["lat"].append(took)
            g["rec"].append(len(set(found) & set(truths[i])) / K)
            g["prec"].append(float(np.mean([label_of[f] == label_of[qid] for f in found])) if found else 0.0)
            g["cat"].append(float(np.mean([cat_of[t] in picked for t in truths[i]])))
            g["n"].append(every if fell_back else len(picked))
            g["ann"].append(float(fell_back))
    out: dict[str, Any] = {}
    for label, temperature, fan, fallback, most in RULES:
        g = got[label]
        n = np.array(g["n"], dtype=int)
        out[label] = {
            **summary(g["lat"]),
            "recall_at_10": round(float(np.mean(g["rec"])), 4),
            "label_p_at_10": round(float(np.mean(g["prec"])), 4),
            "category_recall": round(float(np.mean(g["cat"])), 4),
            "mean_categories": round(float(n.mean()), 3),
            "categories_histogram": {str(k): int(v) for k, v in zip(*np.unique(n, return_counts=True), strict=True)},
            "ann_share": round(float(np.mean(g["ann"])), 4),
            "temperature": temperature or None,
            "fan_out": fan,
            "fallback": fallback,
            "fallback_categories": most,
        }
    return out


# The SQL functions (schema imsrc, db/README.md) beside the service rows they mirror.
SQL_METHODS = [
    ("exact SQL", "exact", "exact", None),
    ("ann SQL", "ann", "ann pgvector", None),
    ("two_stage SQL", "two_stage", "two_stage pgvector", None),
    ("two_stage SQL, small-catalog rule off", "two_stage", FORCED, 0),
]


def sql_similar(conn: psycopg.Connection[Any], image_id: int, mode: str) -> tuple[float, list[int]]:
    """One call of imsrc.similar from a plain client: one statement, one transaction."""
    started = time.perf_counter()
    rows = conn.execute("SELECT image_id FROM imsrc.similar(%s, %s, NULL, %s)", (image_id, K, mode)).fetchall()
    conn.commit()
    return (time.perf_counter() - started) * 1000, [int(r[0]) for r in rows]


def measure_sql(
    url: str,
    settings: Settings,
    ids: np.ndarray,
    rows: np.ndarray,
    truths: list[list[int]],
    service_ids: dict[tuple[str, int], list[int]],
    exact_n: int,
) -> dict[str, Any]:
    """imsrc.similar per mode: latency, recall, and how often it returned the service's ids in its order."""
    out: dict[str, Any] = {}
    url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    for label, mode, service_label, min_rows in SQL_METHODS:
        with psycopg.connect(url) as conn:
            # The service's settings, as db/README.md tells SQL users to mirror them.
            for name, value in (
                ("ef_search", settings.search_ef_search),
                ("score_mass", settings.search_score_mass),
                ("categories", settings.search_categories),
                ("two_stage_min_rows", settings.search_two_stage_min_rows if min_rows is None else min_rows),
            ):
                conn.execute(f"SET imsrc.{name} = '{value}'")
            conn.commit()
            for warm in rows[:5]:
                sql_similar(conn, int(ids[warm]), mode)
            lat, rec, same = [], [], []
            for i, r in enumerate(rows[:exact_n] if mode == "exact" else rows):
                took, got = sql_similar(conn, int(ids[r]), mode)
                lat.append(took)
                rec.append(len(set(got) & set(truths[i])) / K)
                same.append(got == service_ids[(service_label, int(ids[r]))])
        out[label] = {
            **summary(lat),
            "recall_at_10": round(float(np.mean(rec)), 4),
            "same_as_service": round(float(np.mean(same)), 4),
            "service_row": service_label,
        }
    return out


def fixed_ann_ef(settings: Settings, ef: int) -> Settings:
    """Settings whose `ann` walks the model's graph at `ef`, not at the width search sync calibrated."""
    return settings.model_copy(update={"search_ef_search": ef, "search_walk_recall": 0.0})


def tune_ann_ef(
    db: Database, settings: Settings, ids: np.ndarray, rows: np.ndarray, truths: list[list[int]], target: float
) -> tuple[int, float]:
    """The smallest hnsw.ef_search at which service `ann` reaches `target` recall on calibration queries."""
    recall = 0.0
    for ef in EF_LADDER:
        runtime = SearchRuntime.create(fixed_ann_ef(settings, ef))
        got = [service_call(db, runtime, int(ids[r]), "ann", "pgvector")[1] for r in rows]
        recall = float(np.mean([len({h.id for h in g.results} & set(t)) / K for g, t in zip(got, truths, strict=True)]))
        if recall >= target:
            return ef, recall
    return EF_LADDER[-1], recall


# How the timed rows are ordered (results files before this key timed every method of a query in one fixed order).
METHOD_ORDER = (
    "a pass per backend (pgvector, then FAISS, then exact on its queries), methods rotated per query within a pass"
)


def passes(methods: list[M]) -> list[list[M]]:
    """The methods in the passes they are timed in: pgvector's, then FAISS's, then exact. A server holds one
    backend's working set, and at 1M the two do not fit in memory together (24 GB: a 22 GB catalog, 5 GB of FAISS
    index), so interleaving them timed each backend with its pages evicted by the other; exact scans of the whole
    table last, for the same reason. Entries are (label, mode, backend, ...)."""
    order = [
        [m for m in methods if m[1] != "exact" and m[2] == "pgvector"],
        [m for m in methods if m[1] != "exact" and m[2] == "faiss"],
        [m for m in methods if m[1] == "exact"],
    ]
    assert sum(len(g) for g in order) == len(methods), "a method in no pass"
    return [g for g in order if g]


def fresh_faiss(runtimes: Sequence[SearchRuntime]) -> None:
    """A new, empty FaissStore shared by `runtimes`, the old one let go: an index built in memory on first use
    (a fresh catalog: 5 GB at 1M x 1280) would otherwise stay resident beside the mapped files of its save."""
    store = SearchRuntime.create(runtimes[0].settings).faiss
    for rt in runtimes:
        rt.faiss = store
    gc.collect()


def warm_pass(db: Database, runtimes: Sequence[SearchRuntime], model_id: int, backend: str | None) -> None:
    """Before a pass, what a server of that backend warms at start (search/warmup.py), untimed: pgvector's graphs
    then tables within shared_buffers; FAISS's saved index loaded afresh (its files read, checksummed and mapped),
    in a new FaissStore as a starting server has. Exact scans get nothing."""
    if backend == "pgvector":
        with db.session() as session:
            prewarm_search_relations(session, model_id)
    elif backend == "faiss":
        fresh_faiss(runtimes)
        with db.session() as session:
            model = session.get(EmbeddingModel, model_id)
            assert model is not None
            runtimes[0].faiss.get(session, model)


def rotated(methods: list[T], i: int) -> list[T]:
    """The methods for query i, starting at a different one each query. In one fixed order, the first method
    to walk a query's part of a graph read its pages from the OS cache and the next found them in shared_buffers
    (at 1M: ann ef 100 87 ms, then ef 40 5.9 ms; two_stage 29.7 ms, then the same configuration 6.95 ms)."""
    k = i % len(methods)
    return methods[k:] + methods[:k]


KEPT = "kept.json"


def data_args(args: argparse.Namespace) -> dict[str, Any]:
    """What decides a catalog's rows: a kept one is reused only for the same."""
    keys = ("synthetic", "real", "real_calibrated", "real_base", "categories", "dim", "spread", "inference")
    return {k: getattr(args, k) for k in keys}


def reuse(
    db: Database, settings: Settings, model_name: str
) -> tuple[EmbeddingModel, np.ndarray, np.ndarray, dict[str, float]]:
    """A kept catalog's model, image ids and categories (load order), after search sync: what this code's
    sync would add to a catalog built by older code (new calibrations), timed like load's."""
    with db.session() as session:
        model = ModelRepository(session).by_name(model_name)
        if model is None:
            raise SystemExit(f"no {model_name} model in the kept catalog")
    started = time.perf_counter()
    # A catalog kept by older code has its graph over every image on full-precision vectors: rebuilt as
    # `imsrc categories sync` does, so the service walks (and this sizes) the graph it now builds.
    rebuilt = {"reuse_global_rebuild_s": time.perf_counter() - started} if rebuild_legacy_graphs(db) else {}
    build = rebuilt | {f"reuse_{key}": took for key, took in calibrate_and_sync(db, settings, model).items()}
    with db.session() as session:
        model = ModelRepository(session).by_name(model_name)
        assert model is not None
        rows = session.execute(
            text("SELECT image_id, category_id FROM embeddings WHERE model_id = :m ORDER BY image_id"), {"m": model.id}
        ).all()
        session.expunge(model)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    cats = np.array([r[1] for r in rows], dtype=np.int64)
    return model, ids, cats, build


def pick_queries(
    vectors: np.ndarray, ids: np.ndarray, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray, list[list[int]], list[list[int]]]:
    """Query rows, calibration rows and the exact top 10 of each (NumPy), before the vectors are let go."""
    rng = np.random.default_rng(7)
    picks = rng.choice(len(ids), args.queries + args.calibration, replace=False)
    rows, calib_rows = picks[: args.queries], picks[args.queries :]
    return rows, calib_rows, truth_for(vectors, ids, rows), truth_for(vectors, ids, calib_rows)


def measure(
    db: Database,
    settings: Settings,
    data_dir: Path,
    server_url: str,
    queries: tuple[np.ndarray, np.ndarray, list[list[int]], list[list[int]]],
    labels: np.ndarray,
    ids: np.ndarray,
    cats: np.ndarray,
    args: argparse.Namespace,
    pngs: list[bytes] | None,
    start_timing: Callable[[], None],
) -> dict[str, Any]:
    """Every timed row. `start_timing` is called once the untimed set-up (the FAISS build) is done."""
    rows, calib_rows, truths, calib_truths = queries
    exact_n = args.exact_queries or len(rows)  # exact scans of a 1M catalog take seconds each
    cat_of = dict(zip(ids.tolist(), cats.tolist(), strict=True))
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    runtime = SearchRuntime.create(settings)
    with db.session() as session:
        model_id = int(runtime.service(session).model(None).id)
    # The FAISS index builds (or loads) on first use, like in the server: not part of any timed query.
    started = time.perf_counter()
    service_call(db, runtime, int(ids[rows[0]]), "ann", "faiss")
    faiss_first_s = time.perf_counter() - started
    start_timing()
    # Two-stage pgvector's recall on the calibration queries is the target for the tuned `ann` row.
    calib_runtime = SearchRuntime.create(settings.model_copy(update={"search_two_stage_min_rows": 0}))
    two = [service_call(db, calib_runtime, int(ids[r]), "two_stage", "pgvector")[1] for r in calib_rows]
    target = float(
        np.mean([len({h.id for h in g.results} & set(t)) / K for g, t in zip(two, calib_truths, strict=True)])
    )
    ef, ef_recall = tune_ann_ef(db, settings, ids, calib_rows, calib_truths, target)
    tuned = SearchRuntime.create(fixed_ann_ef(settings, ef))
    tuned.faiss = runtime.faiss
    methods = [(label, mode, backend, runtime) for label, mode, backend in METHODS]
    methods.insert(2, (f"ann pgvector, ef_search {ef} (tuned)", "ann", "pgvector", tuned))
    # What two-stage itself costs where the service would answer `ann` (IMSRC_SEARCH_TWO_STAGE_MIN_ROWS).
    forced = SearchRuntime.create(settings.model_copy(update={"search_two_stage_min_rows": 0}))
    forced.faiss = runtime.faiss
    methods.insert(4, (FORCED, "two_stage", "pgvector", forced))
    fresh_faiss([runtime, tuned, forced])  # the index built by the first use: saved, to be mapped by the FAISS pass
    lat: dict[str, list[float]] = {}
    rec: dict[str, list[float]] = {}
    prec: dict[str, list[float]] = {}
    modes: dict[str, set[str]] = {}
    stage1_n: list[int] = []
    stage1_recall: list[float] = []
    stage1_ms: list[float] = []
    stage2_ms: dict[str, list[float]] = {}
    service_ids: dict[tuple[str, int], list[int]] = {}

    def record(label: str, took: float, got: list[int], truth: list[int], query_id: int, mode: str) -> None:
        lat.setdefault(label, []).append(took)
        rec.setdefault(label, []).append(len(set(got) & set(truth)) / K)
        prec.setdefault(label, []).append(
            float(np.mean([label_of[g] == label_of[query_id] for g in got])) if got else 0.0
        )
        modes.setdefault(label, set()).add(mode)

    for group in passes(methods):
        warm_pass(db, [runtime, tuned, forced], model_id, group[0][2])
        for warm in rows[:5]:  # plans, caches, the FAISS index in memory; not measured
            for _, mode, backend, rt in group:
                service_call(db, rt, int(ids[warm]), mode, backend)
        for i, r in enumerate(rows):
            qid = int(ids[r])
            if group[0][1] == "exact" and i >= exact_n:
                break
            for label, mode, backend, rt in rotated(group, i):
                took, resp = service_call(db, rt, qid, mode, backend)
                record(label, took, [h.id for h in resp.results], truths[i], qid, resp.mode)
                service_ids[(label, qid)] = [h.id for h in resp.results]
                stage2_ms.setdefault(label, []).append(resp.timings_ms.stage2)
                if label == FORCED:
                    # A query stage 1 was not sure of was answered by ann: every category searched.
                    picked = set(cat_of.values()) if resp.mode == "ann" else {c.category_id for c in resp.stage1}
                    stage1_n.append(len(picked))
                    stage1_recall.append(float(np.mean([cat_of[t] in picked for t in truths[i]])))
                    stage1_ms.append(resp.timings_ms.stage1)
    # Recorded so the report knows which runs timed every query in one fixed order (before this key).
    out: dict[str, Any] = {"service": {}, "http": {}, "http_image": {}, "method_order": METHOD_ORDER}
    for label in lat:
        out["service"][label] = {
            **summary(lat[label]),
            "recall_at_10": round(float(np.mean(rec[label])), 4),
            "label_p_at_10": round(float(np.mean(prec[label])), 4),
            "stage2_p50_ms": round(statistics.median(stage2_ms[label]), 3),
            "response_mode": sorted(modes[label]),
        }
    out["stage1"] = {
        "mean_categories": round(float(np.mean(stage1_n)), 3),
        "categories_histogram": {str(k): int(v) for k, v in zip(*np.unique(stage1_n, return_counts=True), strict=True)},
        "category_recall": round(float(np.mean(stage1_recall)), 4),
        "p50_ms": round(statistics.median(stage1_ms), 3),
    }
    out["stage1_rules"] = measure_rules(db, settings, ids, rows, truths, cat_of, label_of)
    with db.session() as session:
        out["calibration"] = SearchStateRepository(session).get(state_key(model_id))
        out["walks"] = SearchStateRepository(session).get(walks_key(model_id))  # each category's calibrated width
        out["ann_walk"] = SearchStateRepository(session).get(ann_key(model_id))  # the model's own graph's width
    out["ann_tuning"] = {
        "target_recall": round(target, 4),
        "ef_search": ef,
        "recall_at_ef": round(ef_recall, 4),
        "calibration_queries": len(calib_rows),
    }
    out["faiss_first_use_s"] = round(faiss_first_s, 2)
    out["sql"] = measure_sql(settings.database_url, settings, ids, rows, truths, service_ids, exact_n)
    if args.http:
        http_methods = [(label, mode, backend) for label, mode, backend in METHODS]
        hl: dict[str, list[float]] = {}
        hr: dict[str, list[float]] = {}
        hm: dict[str, set[str]] = {}
        il: dict[str, list[float]] = {}
        im: dict[str, set[str]] = {}
        embed_ms: list[float] = []
        for hgroup in passes(http_methods):
            # Each pass against a server configured for its backend, timed once its warm-up is done: FAISS's
            # loads the saved index and leaves pgvector's pages alone (search/warmup.py).
            backend = hgroup[0][2]
            env = {
                "IMSRC_INFERENCE": args.inference,
                "IMSRC_SEARCH_EF_SEARCH": str(settings.search_ef_search),
                "IMSRC_SEARCH_WARMUP": "true",
            }
            if backend == "faiss":
                env["IMSRC_SEARCH_BACKEND"] = "faiss"
            http = Http(server_url, data_dir, env)
            try:
                warm_s = http.wait_warm()
                if "http_health_s" not in out:
                    out["http_health_s"] = round(http.health_s, 2)
                out.setdefault("http_warm_s", {})[backend or "exact"] = round(warm_s, 2)
                images = pngs is not None and backend == "pgvector"  # image queries go with their backend
                for warm in rows[:5]:
                    for _, mode, backend in hgroup:
                        http.similar(int(ids[warm]), mode, backend)
                    if images and pngs is not None:
                        http.image(pngs[int(warm) % len(pngs)], "two_stage", "pgvector")
                for i, r in enumerate(rows[: args.http_queries]):
                    qid = int(ids[r])
                    if hgroup[0][1] == "exact" and i >= exact_n:
                        break
                    for label, mode, backend in rotated(hgroup, i):
                        took, body = http.similar(qid, mode, backend)
                        hl.setdefault(label, []).append(took)
                        hr.setdefault(label, []).append(len({h["id"] for h in body["results"]} & set(truths[i])) / K)
                        hm.setdefault(label, set()).add(body["mode"])
                    if images and pngs is not None and i < args.image_queries:
                        for label, mode, backend in rotated(
                            [("two_stage pgvector", "two_stage", "pgvector"), ("ann pgvector", "ann", "pgvector")], i
                        ):
                            took, body = http.image(pngs[int(r) % len(pngs)], mode, backend)
                            il.setdefault(label, []).append(took)
                            im.setdefault(label, set()).add(body["mode"])
                            embed_ms.append(body["timings_ms"]["embed"])
            finally:
                http.close()
        if hl:
            out["http"] = {
                label: {
                    **summary(hl[label]),
                    "recall_at_10": round(float(np.mean(hr[label])), 4),
                    "response_mode": sorted(hm[label]),
                }
                for label in hl
            }
            out["http_image"] = {label: {**summary(il[label]), "response_mode": sorted(im[label])} for label in il}
            if embed_ms:
                out["http_image_embed_p50_ms"] = round(statistics.median(embed_ms), 2)
    return out


def cold_restart(
    server: EmbeddedServer,
    url: str,
    data_dir: Path,
    ids: np.ndarray,
    args: argparse.Namespace,
    warm_up: bool,
    wait_warm: bool = False,
) -> dict[str, float]:
    """PostgreSQL restarted (shared_buffers empty; the OS page cache stays warm: dropping it would need the whole
    machine), then a fresh `imsrc serve`: its first `similar` query as soon as /health answers (or, `wait_warm`,
    once /health/ready says the warm-up is done), then, after a pause that lets a warm-up finish, the p50 of a
    few more. Default method (two_stage pgvector)."""
    server.stop()
    server.start()
    http = Http(
        url,
        data_dir,
        {
            "IMSRC_INFERENCE": args.inference,
            "IMSRC_SEARCH_WARMUP": str(warm_up).lower(),
            **({"IMSRC_WORKERS_HTTP": str(args.cold_workers)} if args.cold_workers else {}),
        },
    )
    try:
        rng = np.random.default_rng(11)
        queries = [int(i) for i in rng.choice(ids, 21, replace=False)]
        warm_wait_s = http.wait_warm(timeout_s=300) - http.health_s if wait_warm else 0.0
        first_ms, _ = http.similar(queries[0], "two_stage", None)
        time.sleep(10)
        later = [http.similar(q, "two_stage", None)[0] for q in queries[1:]]
        return {
            "health_s": round(http.health_s, 2),
            "first_query_ms": round(first_ms, 2),
            "workers": args.cold_workers or os.cpu_count() or 1,
            **({"warm_up_wait_s": round(warm_wait_s, 2)} if wait_warm else {}),
            "later_p50_ms": round(statistics.median(later), 2),
        }
    finally:
        http.close()


def check_size(args: argparse.Namespace, scratch: Path) -> None:
    """One line and stop, before any work, when the size asked does not fit this machine. Estimates for rows x
    dim float32 vectors: memory for NumPy's copy, the FAISS build's copy and 2 GiB for the rest (the vectors are
    let go once the exact answers are known); disk for the table, its halfvec copy, two HNSW graphs and the
    saved FAISS index (about 4.5 times the float vectors, measured at 100k), with a margin."""
    rows = args.real or args.real_calibrated or args.synthetic
    dim = 1280 if (args.real or args.real_calibrated) else args.dim
    raw = rows * dim * 4
    check_resources("service_bench", memory=2 * raw + 2 * 2**30, disk=5 * raw + 2 * 2**30, folder=scratch)


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "backend", "migrations", "bench"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return done.stdout.strip() + ("+uncommitted" if dirty else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    kept_dir: Path | None = args.keep or args.reuse
    scratch = kept_dir or ROOT / "bench" / "results" / "tmp" / f"service-{uuid.uuid4().hex[:6]}"
    kept: dict[str, Any] = {}
    if args.reuse:
        try:
            kept = json.loads((args.reuse / KEPT).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--reuse {args.reuse}: not a catalog kept by --keep ({e})") from None
        if kept.get("data_args") != data_args(args):
            raise SystemExit(f"--reuse {args.reuse}: kept for {kept.get('data_args')}, not {data_args(args)}")
    else:
        if args.keep and args.keep.exists() and any(args.keep.iterdir()):
            raise SystemExit(f"--keep {args.keep}: not empty (measure on it with --reuse, or remove it)")
        check_size(args, scratch.parent)
    scratch.mkdir(parents=True, exist_ok=True)
    pngs: list[bytes] | None = None
    if args.real:
        from bench.search import real

        real.check_available()
        vectors, labels, facts = real.embed(args.real, args.inference)
        names = real.CLASSES
        model_name = real.MODEL
        raw, _ = real.images(args.real)
        pngs = [png(a) for a in raw]
        data = {
            "kind": "real",
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), test split first",
            "model": model_name,
            "inference": args.inference,
            "rows": args.real,
            **facts,
        }
    elif args.real_calibrated:
        from bench.search import real

        real.check_available()
        base, base_labels, facts = real.embed(args.real_base, args.inference)
        vectors, labels = real_calibrated(args.real_calibrated, base, base_labels, np.random.default_rng(2))
        del base
        names = real.CLASSES
        # Registered as the real model, so `POST /api/search/image` embeds real Fashion-MNIST images with
        # EfficientNet-Lite0 and searches this catalog: the image row times what a user of a 1M catalog waits for.
        model_name = real.MODEL
        raw, _ = real.images(args.real_base)
        pngs = [png(a) for a in raw[: max(args.image_queries, 1) * 20]]
        del raw
        data = {
            **real.calibrated_facts(args.real_calibrated, args.real_base),
            "image_queries": "real Fashion-MNIST images of the base set, embedded by the server",
        }
    else:
        mixture = make_mixture(args.categories, args.dim, args.spread, seed=1)
        vectors, labels = mixture.sample(args.synthetic, np.random.default_rng(2))
        names = None
        model_name = "bench-synthetic"
        data = {
            "kind": "synthetic",
            "categories": args.categories,
            "dim": args.dim,
            "spread": args.spread,
            "rows": args.synthetic,
        }
    server, url = start_server(scratch / "server", resolve_shared_buffers(args.shared_buffers))
    timing = ExitStack()
    timed: dict[str, Any] = {}

    def start_timing() -> None:
        info = server.info()
        roots = [os.getpid(), *([info.pid] if info else [])]
        timed.update(timing.enter_context(timed_phase(args.timing_lock, args.timing_nice, roots)))
        print(f"timed phase: {timed}", flush=True)

    try:
        name = "imsrc_bench"
        with psycopg.connect(url, autocommit=True) as conn:
            if not args.reuse:
                conn.execute(f'CREATE DATABASE "{name}"')
            settings_row = {s: conn.execute(f"SHOW {s}").fetchone()[0] for s in SERVER_SETTINGS}  # type: ignore[index]
        db_url = database_url(url, name)
        upgrade(db_url)
        settings = Settings(
            database_url=db_url,
            data_dir=scratch / "data",
            inference=args.inference,  # type: ignore[call-arg]
            _env_file=None,
        )
        engine = make_engine(db_url)
        db = Database(url=db_url, engine=engine, settings=settings, revision="head", pgvector_version="")
        n_cat = int(labels.max()) + 1
        # The exact answers are computed as soon as the rows are in, and the vectors let go before the index
        # builds (5 GB at 1M x 1280: the catalog has them now).
        held = [vectors]
        del vectors
        picked: list[tuple[np.ndarray, np.ndarray, list[list[int]], list[list[int]]]] = []
        if args.reuse:
            # The kept catalog as this code would have left it: its migrations, then search sync (what a
            # deployment upgraded in place gets); the same seeds give the same vectors, so the same queries.
            _model, ids, cats, build = reuse(db, settings, model_name)
            build = {**kept.get("build_s", {}), **build}
            picked.append(pick_queries(held.pop(), ids, args))
        else:
            _model, build, ids, cats = load(
                db,
                settings,
                held,
                labels,
                n_cat,
                model_name=model_name,
                category_names=names,
                global_graph=(HNSW_M, HNSW_EF_CONSTRUCTION),
                after_copy=lambda copied, copied_ids: picked.append(pick_queries(copied, copied_ids, args)),
            )
            if args.keep:
                kept = {"data_args": data_args(args), "commit": commit(), "build_s": build, "built_at": time.time()}
                (args.keep / KEPT).write_text(json.dumps(kept, indent=1) + "\n")
        queries = picked[0]
        result = measure(db, settings, scratch / "data", db_url, queries, labels, ids, cats, args, pngs, start_timing)
        engine.dispose()
        if args.http:
            result["cold_restart"] = {
                key: cold_restart(server, db_url, scratch / "data", ids, args, on, wait)
                for key, on, wait in (
                    ("warm_up_off", False, False),
                    ("warm_up_on", True, False),
                    ("warm_up_on_after_ready", True, True),
                )
            }
    finally:
        timing.close()
        server.stop()
        if kept_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    imsrc_settings = {
        k: getattr(settings, k)
        for k in (
            "search_ef_search",
            "search_exact_max_rows",
            "search_categories",
            "search_score_mass",
            "search_stage1_temperature",
            "search_stage1_coverage",
            "search_stage1_fallback",
            "faiss_flat_max_rows",
            "search_backend",
            "inference",
        )
    }
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--results-dir" and sys.argv[i] != "--results-dir"]
    return {
        "command": " ".join(["python", "bench/search/service_bench.py", *argv]),
        # Run outside the machine-wide bench lock: only its quality figures (recall, precision, categories) are
        # published; its latencies shared the machine with other timing runs.
        "timings_published": not args.unlocked,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_start],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "timed_phase": timed,
        "server": settings_row,
        "settings": imsrc_settings,
        "data": data,
        "k": K,
        "global_hnsw": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION},
        "queries": args.queries,
        "exact_queries": args.exact_queries or args.queries,
        "build_s": {k: round(v, 2) for k, v in build.items()},
        "code": commit(),
        # Measured on a catalog kept from an earlier run's build (--keep / --reuse): which code built it.
        **({"reused": {"built_by": kept.get("commit"), "built_at": kept.get("built_at")}} if args.reuse else {}),
        **result,
    }


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally clauses: stop the servers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--synthetic", type=int, metavar="ROWS", help="Gaussian mixture of this many vectors")
    what.add_argument(
        "--real",
        type=int,
        metavar="ROWS",
        help="this many Fashion-MNIST images embedded with EfficientNet-Lite0 (cached)",
    )
    what.add_argument(
        "--real-calibrated",
        type=int,
        metavar="ROWS",
        help="this many vectors made from the real embeddings plus noise (sizes beyond 70k)",
    )
    parser.add_argument("--real-base", type=int, default=10_000, help="real embeddings --real-calibrated draws on")
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--spread", type=float, default=0.8)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=50, help="separate queries that tune ann's ef_search")
    parser.add_argument("--http-queries", type=int, default=100)
    parser.add_argument("--image-queries", type=int, default=30, help="real data: POST /api/search/image queries")
    parser.add_argument("--no-http", dest="http", action="store_false")
    parser.add_argument("--inference", default="auto", help="IMSRC_INFERENCE for embedding (real data)")
    parser.add_argument(
        "--cold-workers",
        type=int,
        default=0,
        help="imsrc serve workers for the cold-restart rows (0: its default, one per core)",
    )
    parser.add_argument(
        "--exact-queries",
        type=int,
        default=0,
        help="time mode exact on only the first N queries (0: all); each exact scan of 1M rows takes seconds",
    )
    parser.add_argument(
        "--timing-lock",
        type=Path,
        help="wait for an exclusive flock on this file before the timed phase (keeps timing runs apart)",
    )
    parser.add_argument(
        "--timing-nice",
        type=int,
        help="renice this run and its PostgreSQL to this for the timed phase (the build can run at low priority)",
    )
    parser.add_argument(
        "--shared-buffers",
        default="1GB",
        help="PostgreSQL's shared_buffers for the run; auto: what `imsrc serve` gives the embedded server on this "
        "machine (a quarter of the memory, up to 8 GB)",
    )
    parser.add_argument("--report", action="store_true", help="rewrite BENCHMARKS.md's Search section and stop")
    parser.add_argument(
        "--unlocked",
        action="store_true",
        help="this run does not hold the bench lock: the report publishes its quality figures, not its latencies",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where to write the results file")
    kept = parser.add_mutually_exclusive_group()
    kept.add_argument("--keep", type=Path, metavar="DIR", help="build into DIR and keep it (server, data, kept.json)")
    kept.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="measure on a catalog kept by --keep (same data flags): migrations and search sync, then the timings",
    )
    args = parser.parse_args()
    from bench.search.service_report import write_markdown

    if args.report:
        write_markdown()
        return
    if not (args.real or args.synthetic or args.real_calibrated):
        parser.error("give --synthetic ROWS, --real ROWS or --real-calibrated ROWS")
    if args.real and args.real > 70_000:
        parser.error("Fashion-MNIST has 70,000 images")
    if args.exact_queries < 0:
        parser.error("--exact-queries: a count of queries (0: all)")
    if args.timing_nice is not None and not -20 <= args.timing_nice <= 19:
        parser.error("--timing-nice: a nice value from -20 to 19")
    result = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{result['data']['kind']}-{result['data']['rows']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("service", "http", "http_image", "stage1", "ann_tuning")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
