"""Synthetic catalog for the search benchmark: a Gaussian mixture loaded with binary COPY, then indexed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import ModelRepository, global_index_ddl
from imsrc.config import Settings
from imsrc.db.embedded import EmbeddedServer
from imsrc.db.session import Database
from imsrc.search.pg_queries import INDEX_PREFIX
from imsrc.search.sync import ensure_category_indexes, sync_search
from imsrc.search.walks import calibrate_ann, calibrate_walks

MODEL = "bench-synthetic-512"


@dataclass
class Mixture:
    centres: np.ndarray
    spread: float
    seed: int
    bases: np.ndarray | None = None  # (k, r, d): per-category subspace of the noise; None = isotropic

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n points, equal shares per category (shuffled), unit length. Returns (vectors, labels)."""
        k, d = self.centres.shape
        labels = rng.permutation(np.arange(n) % k)
        out = np.empty((n, d), dtype=np.float32)
        for start in range(0, n, 50_000):  # in blocks: 1M x 512 noise in one go would need 4 GB more
            lab = labels[start : start + 50_000]
            if self.bases is None:
                noise = rng.standard_normal((len(lab), d), dtype=np.float32) * (self.spread / np.sqrt(d))
            else:  # most of the spread along a few directions per category, like real embeddings
                r = self.bases.shape[1]
                z = rng.standard_normal((len(lab), r), dtype=np.float32) * (self.spread / np.sqrt(r))
                noise = np.einsum("nr,nrd->nd", z, self.bases[lab])
                noise += rng.standard_normal((len(lab), d), dtype=np.float32) * (0.1 * self.spread / np.sqrt(d))
            x = self.centres[lab] + noise
            out[start : start + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out, labels


def make_mixture(categories: int, dimension: int, spread: float, seed: int, intrinsic_dim: int = 0) -> Mixture:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((categories, dimension)).astype(np.float32)
    bases = None
    if intrinsic_dim:
        raw = rng.standard_normal((categories, dimension, intrinsic_dim)).astype(np.float32)
        bases = np.stack([np.linalg.qr(b)[0].T for b in raw]).astype(np.float32)  # orthonormal rows
    return Mixture(centres / np.linalg.norm(centres, axis=1, keepdims=True), spread, seed, bases)


REAL_CALIBRATED_NOISE = 0.5  # real_calibrated's noise, as results files record it (real.calibrated_facts)


def real_calibrated(
    n: int, base: np.ndarray, labels: np.ndarray, rng: np.random.Generator, noise: float = REAL_CALIBRATED_NOISE
) -> tuple[np.ndarray, np.ndarray]:
    """n vectors shaped by real embeddings: each is a random real vector plus Gaussian noise with its category's
    per-dimension spread (times `noise`), renormalised. Categories then overlap as the real ones do (stage 1 makes
    the real mistakes), unlike the isotropic mixture; the label is the real vector's.

    Caveat (measured by bench/search/stage1_offline.py --real-calibrated): vectors drawn from the same real one
    ("siblings") are each other's nearest neighbours, and there are n / len(base) of each on average, so beyond a
    few times the base size an exact top 10 is mostly siblings, which share the label: label precision on these
    vectors rewards finding near-copies, not the category. Judge label precision on real embeddings."""
    out, labels_out, _ = real_calibrated_with_sources(n, base, labels, rng, noise)
    return out, labels_out


def real_calibrated_with_sources(
    n: int, base: np.ndarray, labels: np.ndarray, rng: np.random.Generator, noise: float = REAL_CALIBRATED_NOISE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """real_calibrated, plus each vector's source row in `base`."""
    spread = {int(c): base[labels == c].std(axis=0) * noise for c in np.unique(labels)}
    pick = rng.integers(0, len(base), n)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 20_000):
        rows = pick[start : start + 20_000]
        sigma = np.stack([spread[int(c)] for c in labels[rows]])
        x = base[rows] + rng.standard_normal(sigma.shape, dtype=np.float32) * sigma
        out[start : start + len(rows)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels[pick].astype(np.int64), pick


def _binary_copy(columns: list[tuple[str, np.ndarray]], vectors: np.ndarray) -> bytes:
    """A PGCOPY stream of int4/int8 columns followed by one pgvector column, built by NumPy."""
    n, d = vectors.shape
    fields: list[tuple[str, str]] = [("nf", ">i2")]
    for name, arr in columns:
        fields += [(f"l_{name}", ">i4"), (name, ">i4" if arr.dtype == np.int32 else ">i8")]
    fields += [("lv", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (d,))]
    rows = np.zeros(n, dtype=np.dtype(fields))
    rows["nf"] = len(columns) + 1
    for name, arr in columns:
        rows[f"l_{name}"] = 4 if arr.dtype == np.int32 else 8
        rows[name] = arr
    rows["lv"], rows["dim"], rows["vec"] = 4 + 4 * d, d, vectors
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + rows.tobytes() + b"\xff\xff"


def start_server(data_dir: Path, shared_buffers: str) -> tuple[EmbeddedServer, str]:
    """A scratch embedded server and its maintenance-database URL, restarted with `shared_buffers` when given:
    PostgreSQL's default 128 MB cache makes every scan of a 100k+ table go through the OS page cache (a syscall
    per 8 KB page); a server that holds a vector catalog is given more."""
    server = EmbeddedServer(data_dir)
    url = server.start().url("postgres")
    if shared_buffers:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
        server.stop()
        url = server.start().url("postgres")
    return server, url


@contextmanager
def bulk_load(url: str) -> Iterator[psycopg.Connection]:
    """A connection for copy_rows into a fresh catalog; then the ids' sequence moved past the rows, commit,
    VACUUM ANALYZE. embeddings' user triggers are off meanwhile (as the table owner): the category fill and the
    change log are for live writes, and the copy into category_vectors has nothing to do while no category
    has a partition, which is checked (a partition's rows would silently go missing)."""
    with psycopg.connect(url) as conn:
        partitions = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('category_vectors')"
        ).fetchone()
        if partitions and partitions[0]:
            raise RuntimeError("bulk_load needs a catalog without category_vectors partitions (a fresh one)")
        conn.execute("ALTER TABLE embeddings DISABLE TRIGGER USER")
        yield conn
        conn.execute("ALTER TABLE embeddings ENABLE TRIGGER USER")
        conn.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), (SELECT max(id) FROM images))")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE images")
        conn.execute("VACUUM ANALYZE embeddings")


def copy_rows(
    conn: psycopg.Connection, model_id: int, ids: np.ndarray, category_of: np.ndarray, vectors: np.ndarray
) -> None:
    """One batch of catalog rows by COPY: images (placeholder metadata, no bytes) and their vectors."""
    with conn.cursor().copy(
        "COPY images (id, sha256, width, height, format, byte_size, category_id) FROM STDIN"
    ) as copy:
        for i, c in zip(ids.tolist(), category_of.tolist(), strict=True):
            copy.write_row((i, i.to_bytes(32, "big"), 8, 8, "PNG", 100, c))
    stream = _binary_copy(
        [("model_id", np.full(len(ids), model_id, np.int32)), ("image_id", ids), ("category_id", category_of)], vectors
    )
    with conn.cursor().copy(
        "COPY embeddings (model_id, image_id, category_id, embedding) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.write(stream)


def load(
    database: Database,
    settings: Settings,
    vectors: np.ndarray | list[np.ndarray],
    labels: np.ndarray,
    n_categories: int,
    *,
    parallel_builds: bool = False,
    model_name: str = MODEL,
    category_names: list[str] | None = None,
    global_graph: tuple[int, int] | None = None,
    indexes: bool = True,
    after_copy: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[EmbeddingModel, dict[str, float], np.ndarray, np.ndarray]:
    """Fresh rows for the benchmark model: categories, images, embeddings (COPY), then every index.

    global_graph: (m, ef_construction) for the per-model HNSW index (mode `ann`), so the baseline can get the
    same graph density as the per-category indexes; None builds it as the service does (pgvector defaults).
    indexes False: rows only (no HNSW index, no prototypes), for a benchmark that times the builds itself.
    after_copy: called with the vectors and their image ids once the rows are in, before any index is built.
    `vectors` may be a one-element list, which is emptied here: then nothing holds the vectors after the copy
    and that call (a call's arguments stay referenced by its caller until it returns), and they are freed for
    the builds (5 GB at 1M x 1280-d, beside a 6 GB HNSW build and shared_buffers on a 24 GB machine: a 1M run
    was OOM-killed)."""
    if isinstance(vectors, list):
        vectors = vectors.pop()
    dimension = int(vectors.shape[1])
    timings: dict[str, float] = {}
    names = category_names or [f"bench-{i:03d}" for i in range(n_categories)]
    with database.session() as session:
        models = ModelRepository(session)
        model = models.register(name=model_name, dimension=dimension, family="bench", params={}, supports_text=False)
        models.set_active(model)
        session.execute(text(f"DROP INDEX IF EXISTS ix_embeddings_hnsw_m{model.id}"))
        cat_ids = [
            int(
                session.execute(
                    text(
                        "INSERT INTO categories (name) VALUES (:n)"
                        " ON CONFLICT ((lower(name))) DO UPDATE SET name = EXCLUDED.name RETURNING id"
                    ),
                    {"n": names[i]},
                ).scalar_one()
            )
            for i in range(n_categories)
        ]
    category_of = np.asarray(cat_ids, dtype=np.int64)[labels]
    started = time.perf_counter()
    with bulk_load(database.url) as conn:
        first = int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM images").fetchone()[0])  # type: ignore[index]
        ids = np.arange(first, first + len(vectors), dtype=np.int64)
        chunk = 20_000
        for start in range(0, len(vectors), chunk):
            stop = start + chunk
            copy_rows(conn, model.id, ids[start:stop], category_of[start:stop], vectors[start:stop])
    timings["copy_s"] = time.perf_counter() - started
    if after_copy is not None:
        after_copy(vectors, ids)
    del vectors
    if not indexes:
        return model, timings, ids, category_of

    def build_global() -> None:
        with database.session() as session:
            _maintenance(session)
            started = time.perf_counter()
            if global_graph is not None:  # same name as the service's index, so mode `ann` walks this one
                storage = f"m = {int(global_graph[0])}, ef_construction = {int(global_graph[1])}"
                session.execute(text(global_index_ddl(model.id, dimension, options=storage)))
            ModelRepository(session).ensure_index(model)
            timings["hnsw_global_build_s"] = time.perf_counter() - started

    def build_per_category() -> None:
        with database.session() as session:
            _maintenance(session)
            started = time.perf_counter()
            ensure_category_indexes(session, settings, model)
            timings["hnsw_per_category_build_s"] = time.perf_counter() - started

    if parallel_builds:  # one core each; at 1M rows the two builds otherwise take ~50 min one after the other
        other = threading.Thread(target=build_global)
        other.start()
        build_per_category()
        other.join()
        if "hnsw_global_build_s" not in timings:
            raise RuntimeError("the global HNSW build failed (see the thread's traceback above)")
    else:
        build_global()
        build_per_category()
    timings.update(calibrate_and_sync(database, settings, model))
    return model, timings, ids, category_of


def calibrate_and_sync(database: Database, settings: Settings, model: EmbeddingModel) -> dict[str, float]:
    """The walk widths (search/walks.py: each category's, then the model's own graph's), then search sync, each
    timed; the sync then finds every width current. On a kept catalog (service_bench --reuse) only what this
    code's sync would add."""
    timings: dict[str, float] = {}
    with database.session() as session:
        for key, calibrate in (("walk_calibration_s", calibrate_walks), ("ann_calibration_s", calibrate_ann)):
            started = time.perf_counter()
            calibrate(session, settings, model)
            timings[key] = time.perf_counter() - started
    with database.session() as session:
        started = time.perf_counter()
        sync_search(session, settings, model_id=model.id, autogroup_images=False)
        timings["prototypes_s"] = time.perf_counter() - started
    return timings


def _maintenance(session: Session) -> None:
    session.execute(text("SET LOCAL maintenance_work_mem = '6GB'"))
    session.execute(text("SET LOCAL max_parallel_maintenance_workers = 1"))


def index_sizes(session: Session, model_id: int) -> dict[str, int]:
    rows = session.execute(
        text(
            "SELECT indexname, pg_relation_size(format('%I', indexname)::regclass) FROM pg_indexes "
            "WHERE tablename = 'embeddings' OR tablename LIKE 'category_vectors%'"
        )
    ).all()
    glob = sum(int(s) for n, s in rows if n == f"ix_embeddings_hnsw_m{model_id}")
    per = sum(int(s) for n, s in rows if n.startswith(f"{INDEX_PREFIX}_m{model_id}_c"))
    table = int(session.execute(text("SELECT pg_table_size('embeddings')")).scalar_one())
    return {"hnsw_global_bytes": glob, "hnsw_per_category_bytes": per, "embeddings_table_bytes": table}


def prewarm(database: Database) -> int:
    """Load the embeddings table and all its indexes into shared_buffers (a server in steady use has them
    there; a freshly built one has them only in the OS page cache, one syscall per 8 KB page). Returns bytes."""
    with database.session() as session:
        session.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
        blocks = session.execute(
            text(
                "SELECT coalesce(sum(pg_prewarm(c.oid)), 0) FROM pg_class c WHERE c.oid = 'embeddings'::regclass "
                "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass('category_vectors')) "
                "OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'embeddings'::regclass OR indrelid IN "
                "(SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass('category_vectors')))"
            )
        ).scalar_one()
    return int(blocks) * 8192


def reuse(
    database: Database, build_file: str | None
) -> tuple[EmbeddingModel, dict[str, float], np.ndarray, np.ndarray]:
    """The benchmark model of a kept database, its image ids and categories in load order, and (from an
    earlier results file, if given) the build times measured when it was loaded."""
    import json
    from pathlib import Path

    from imsrc.search.sync import rebuild_legacy_graphs

    rebuild_legacy_graphs(database)  # a catalog kept by older code: walk the graph the service now builds
    with database.session() as session:
        model = ModelRepository(session).by_name(MODEL)
        if model is None:
            raise SystemExit(f"no {MODEL} model in this database")
        rows = session.execute(
            text("SELECT image_id, category_id FROM embeddings WHERE model_id = :m ORDER BY image_id"), {"m": model.id}
        ).all()
        session.expunge(model)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    cats = np.array([r[1] for r in rows], dtype=np.int64)
    build: dict[str, float] = {}
    if build_file:
        saved = json.loads(Path(build_file).read_text())
        build = next((s["build_s"] for s in saved["sizes"] if s["rows"] == len(ids)), {})
    return model, dict(build), ids, cats
