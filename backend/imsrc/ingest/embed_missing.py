"""`imsrc embed`: add one model's vectors to images that lack them, from stored bytes or their files.

Resumable by construction: each batch commits, and the next run starts from what is still missing.
The model is registered (not activated) first, so searches keep using the active model meanwhile."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.ingest.decode import DecodeOptions, Processed, WorkItem
from imsrc.ingest.pipeline import JobProgress, job_key, resolve_workers
from imsrc.ingest.pool import InlinePool, OrderedPool
from imsrc.ingest.repository import IngestRepository, JobRepository
from imsrc.ingest.service import OUTCOMES, embed_processed, ensure_model
from imsrc.search.sync import only, sync_search

PAGE = 256


@dataclass
class EmbedSummary:
    job_id: int
    model: str
    embedded: int
    failed: int
    remaining: int
    status: str
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)


def embed_missing(
    database: Database,
    embedder: Embedder,
    *,
    workers: int = 0,
    batch_size: int = 16,
    stop: threading.Event | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> EmbedSummary:
    """Commits once per batch (call it from a command boundary)."""
    stop = stop or threading.Event()
    started = time.monotonic()
    with database.session() as session:
        model = ensure_model(session, embedder, database.settings)
        model_id = model.id
        repo = IngestRepository(session)
        todo_total = repo.missing_embedding_count(model_id)
        jobs = JobRepository(session)
        key = job_key("embed", [], {}, model.name)
        job = jobs.find_resumable(key)
        job_id = (
            job["id"]
            if job
            else jobs.create(
                kind="embed",
                job_key=key,
                paths=[],
                options={"model": model.name},
                model_id=model_id,
                model_name=model.name,
            )
        )
        jobs.mark(job_id, "running")
        jobs.set_total(job_id, todo_total)
    progress = JobProgress(job_id=job_id, total=todo_total)
    options = DecodeOptions(
        preprocess=embedder.preprocess, max_pixels=database.settings.max_pixels, thumbnails=False, phash=False
    )
    n_workers = resolve_workers(workers)
    pool: OrderedPool | InlinePool = (
        InlinePool(options) if todo_total < 48 else OrderedPool(n_workers, options, max_pending=n_workers * 4)
    )
    batches: queue.Queue[list[tuple[Processed, bytes]] | None] = queue.Queue(maxsize=2)
    failures: list[dict[str, str]] = []
    state = {"embedded": 0, "failed": 0}
    error: list[BaseException] = []

    def consume() -> None:
        try:
            while (batch := batches.get()) is not None:
                _write(database, embedder, model_id, job_id, batch, batch_size, state, failures, progress)
                if on_progress:
                    on_progress(progress)
        except BaseException as exc:
            error.append(exc)

    consumer = threading.Thread(target=consume, name="imsrc-embed-write", daemon=True)
    consumer.start()
    expected: dict[str, bytes] = {}
    current: list[tuple[Processed, bytes]] = []
    try:
        for chunk in _chunks(_missing(database, model_id), max(1, min(16, batch_size // n_workers))):
            if stop.is_set() or error:
                break
            for item, digest in chunk:
                expected[item.key] = digest
            if pool.full:
                current = _collect(pool, expected, current, batches, batch_size, block=True)
            pool.submit([item for item, _ in chunk])
            current = _collect(pool, expected, current, batches, batch_size, block=False)
        while len(pool) and not error:
            current = _collect(pool, expected, current, batches, batch_size, block=True)
        if current and not error:
            batches.put(current)
    finally:
        batches.put(None)
        consumer.join()
        pool.close(cancel=True)
    if error:
        raise error[0]
    with database.session() as session:
        # Every category of this model is new to it: sync finds them all stale and builds their prototypes.
        sync_search(session, database.settings, model_id=model_id, embedders=only(embedder))
        remaining = IngestRepository(session).missing_embedding_count(model_id)
        status = "interrupted" if stop.is_set() else "completed"
        JobRepository(session).mark(job_id, status, finished=status == "completed")
    return EmbedSummary(
        job_id,
        embedder.name,
        state["embedded"],
        state["failed"],
        remaining,
        status,
        round(time.monotonic() - started, 3),
        failures,
    )


def _collect(
    pool: OrderedPool | InlinePool,
    expected: dict[str, bytes],
    current: list[tuple[Processed, bytes]],
    batches: queue.Queue[list[tuple[Processed, bytes]] | None],
    batch_size: int,
    block: bool,
) -> list[tuple[Processed, bytes]]:
    while len(pool) and (block or pool.head_ready()):
        for p in pool.pop():
            current.append((p, expected.pop(p.key)))
        if len(current) >= batch_size:
            batches.put(current[:batch_size])
            current = current[batch_size:]
        if block and not pool.full:
            break
    return current


def _write(
    database: Database,
    embedder: Embedder,
    model_id: int,
    job_id: int,
    batch: list[tuple[Processed, bytes]],
    batch_size: int,
    state: dict[str, int],
    failures: list[dict[str, str]],
    progress: JobProgress,
) -> None:
    for p, digest in batch:  # a referenced file that changed since indexing is not this image any more
        if p.ok and p.sha256 != digest:
            p.ok, p.reason, p.tensor = False, "the file changed since it was indexed (different content)", None
    embed_processed(embedder, [p for p, _ in batch], pad_to=batch_size)
    good = [(int(p.key.split(":", 1)[1].split(" ", 1)[0]), p.vector) for p, _ in batch if p.ok]
    bad = [(p.key, "failed", p.reason, None, None, None) for p, _ in batch if not p.ok]
    with database.session() as session:
        IngestRepository(session).copy_embeddings(model_id, good)  # type: ignore[arg-type]
        jobs = JobRepository(session)
        jobs.record_files(job_id, bad)
        jobs.add_counts(job_id, {"new": len(good), "failed": len(bad)})
    state["embedded"] += len(good)
    state["failed"] += len(bad)
    failures.extend({"image": k, "reason": r or ""} for k, _, r, *_ in bad)
    progress.counts["new"] += len(good)
    progress.counts["failed"] += len(bad)
    progress.done += len(batch)


def _missing(database: Database, model_id: int) -> Iterator[tuple[WorkItem, bytes]]:
    """Images without this model's vector, id order, a page at a time (keyset, so it never rescans)."""
    after = 0
    while True:
        with database.session() as session:
            rows = IngestRepository(session).missing_embedding_page(model_id, after, PAGE)
        if not rows:
            return
        for image_id, digest, data, path in rows:
            key = f"image:{image_id}" + (f" {path}" if path else "")
            if data is not None:
                yield WorkItem(key=key, data=bytes(data)), bytes(digest)
            elif path is not None:
                yield WorkItem(key=key, path=path), bytes(digest)
            else:
                yield WorkItem(key=key, fail_reason="neither stored bytes nor a source file"), bytes(digest)
        after = rows[-1][0]


def _chunks(items: Iterator[tuple[WorkItem, bytes]], size: int) -> Iterator[list[tuple[WorkItem, bytes]]]:
    chunk: list[tuple[WorkItem, bytes]] = []
    for pair in items:
        chunk.append(pair)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


__all__ = ["OUTCOMES", "EmbedSummary", "embed_missing"]
