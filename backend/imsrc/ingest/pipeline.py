"""Folder jobs: scan -> worker processes -> batched embedding -> batched writes, all stages overlapping.

    main thread     scan, skip what is done, feed the process pool (bounded), collect results in order
    embed thread    one forward pass per batch (torch releases the GIL)
    writer thread   one transaction per batch (write_batch), then progress

Queues between the threads hold at most two batches, so memory stays flat on any number of files.
Commits: the writer commits once per batch; that is what makes a job resumable. Re-running the same
command continues the unfinished job: files it recorded are skipped, and so are paths whose size and
mtime match what the catalog holds. Ctrl-C (the `stop` event) ends the job after the batches in flight."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.errors import ConflictError, ImsrcError
from imsrc.ingest.captions import apply_sidecars
from imsrc.ingest.decode import DecodeOptions, Processed, WorkItem
from imsrc.ingest.phash import PhashIndex
from imsrc.ingest.pool import InlinePool, OrderedPool
from imsrc.ingest.repository import IngestRepository, JobRepository
from imsrc.ingest.scan import check_roots, count_files, scan
from imsrc.ingest.service import OUTCOMES, IndexPhashMatcher, WriteContext, ensure_model
from imsrc.ingest.stages import Abort, Stages
from imsrc.search.sync import only, sync_search

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 256  # paths checked against the catalog per query


@dataclass
class JobProgress:
    job_id: int
    total: int | None = None
    done: int = 0  # files decided in this job, including before a resume
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    resumed: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass
class JobSummary:
    job_id: int
    status: str
    resumed: bool
    model: str
    counts: dict[str, int]  # the whole job, across resumes
    run_counts: dict[str, int]  # this run only
    ignored_files: int
    seconds: float
    files_per_second: float
    stage_seconds: dict[str, float]
    captions: dict[str, Any] | None = None  # sidecar captions (index jobs): ingest.captions.SidecarReport

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class JobSpec:
    kind: str  # index | demo
    paths: list[str]
    options: dict[str, Any]
    items: Callable[[], Iterator[WorkItem]]
    count: Callable[[], int] | None
    store_bytes: bool
    workers: int
    batch_size: int
    # Fewer files than this: decode in this process, start no workers. 0: always decode in worker processes,
    # even while they start (else the first chunks are decoded here until a worker is ready).
    inline_below: int = 48


def job_key(kind: str, paths: Iterable[str], options: dict[str, Any], model: str) -> str:
    raw = json.dumps([kind, sorted(paths), options, model], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def run_index_job(
    database: Database,
    embedder: Embedder,
    paths: list[str],
    *,
    category: str | None = None,
    category_from_folder: bool = False,
    store: str = "reference",
    workers: int = 0,
    batch_size: int = 16,
    inline_below: int = 48,
    stop: threading.Event | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobSummary:
    """Index folders/files. Commits once per batch (and to open and close the job): call it from a
    command boundary, never inside another unit of work."""
    roots = check_roots(paths)
    ignored = [0]
    spec = JobSpec(
        kind="index",
        paths=roots,
        options={"category": category, "category_from_folder": category_from_folder, "store": store},
        items=lambda: scan(roots, category=category, category_from_folder=category_from_folder, counter=ignored),
        count=lambda: count_files(roots),
        store_bytes=store == "copy",
        workers=workers,
        batch_size=batch_size,
        inline_below=inline_below,
    )
    summary = run_job(database, embedder, spec, stop=stop, on_progress=on_progress)
    summary.ignored_files = ignored[0]
    # After the job, so unchanged files' sidecars count too: an edited sidecar updates the caption.
    summary.captions = apply_sidecars(database, roots).as_dict()
    return summary


def resolve_workers(workers: int) -> int:
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_job(
    database: Database,
    embedder: Embedder,
    spec: JobSpec,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobSummary:
    stop = stop or threading.Event()
    started = time.monotonic()
    with database.session() as session:
        model = ensure_model(session, embedder, database.settings)
        model_id, model_name = model.id, model.name
    key = job_key(spec.kind, spec.paths, spec.options, model_name)
    # The job's advisory lock belongs to one connection: keep it for the whole job (a pooled session would
    # hand its connection back at every commit, and the lock with it).
    lock_conn = database.engine.connect()
    control = Session(bind=lock_conn, expire_on_commit=False)
    locked: int | None = None
    try:
        jobs = JobRepository(control)
        existing = jobs.find_resumable(key)
        if existing is not None and not jobs.try_lock(existing["id"]):
            raise ConflictError(f"job {existing['id']} is being run by another process right now")
        if existing is None:
            job_id = jobs.create(
                kind=spec.kind,
                job_key=key,
                paths=spec.paths,
                options={**spec.options, "model": model_name},
                model_id=model_id,
                model_name=model_name,
            )
            jobs.try_lock(job_id)
        locked = existing["id"] if existing is not None else job_id
        if existing is not None:
            job_id = existing["id"]
            jobs.mark(job_id, "running")
        control.commit()
        progress = JobProgress(job_id=job_id, resumed=existing is not None)
        if existing is not None:
            for k in OUTCOMES:
                progress.counts[k] = int(existing[f"{k}_count"])
            progress.done = sum(progress.counts.values())
        status, stage_seconds, run_counts = _run(
            database, embedder, spec, control, job_id, model_id, progress, stop, on_progress
        )
        job = JobRepository(control).get(job_id) or {}
        control.commit()
        counts = {k: int(job.get(f"{k}_count", 0)) for k in OUTCOMES}
        elapsed = time.monotonic() - started
        return JobSummary(
            job_id=job_id,
            status=status,
            resumed=progress.resumed,
            model=model_name,
            counts=counts,
            run_counts=run_counts,
            ignored_files=0,
            seconds=round(elapsed, 3),
            files_per_second=round(sum(run_counts.values()) / elapsed, 2) if elapsed else 0.0,
            stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        )
    finally:
        control.rollback()
        if locked is not None:
            with contextlib.suppress(Exception):  # a dead connection has dropped the lock already
                JobRepository(control).unlock(locked)
                control.commit()
        control.close()
        lock_conn.close()


def _run(
    database: Database,
    embedder: Embedder,
    spec: JobSpec,
    control: Any,
    job_id: int,
    model_id: int,
    progress: JobProgress,
    stop: threading.Event,
    on_progress: Callable[[JobProgress], None] | None,
) -> tuple[str, dict[str, float], dict[str, int]]:
    jobs, sources = JobRepository(control), IngestRepository(control)
    index = PhashIndex(database.settings.duplicate_threshold, sources.canonical_hashes())
    control.commit()
    if spec.count is not None:
        threading.Thread(target=_count, args=(spec.count, progress, on_progress), daemon=True).start()
    workers = resolve_workers(spec.workers)
    options = DecodeOptions(
        preprocess=embedder.preprocess,
        max_pixels=database.settings.max_pixels,
        thumbnail_size=database.settings.thumbnail_size,
        keep_bytes=spec.store_bytes,
    )
    chunk_size = max(1, min(16, spec.batch_size // workers))
    todo: Iterator[tuple[list[WorkItem], int]] = _todo(spec.items(), jobs, sources, job_id, progress.resumed, control)
    head = list(itertools.islice(todo, 2))
    small = len(head) < 2 and sum(len(fresh) for fresh, _ in head) < spec.inline_below
    if not small and not _picklable(options):
        log.warning("the model's preprocessing cannot be sent to worker processes; decoding in this process")
        small = True
    todo = itertools.chain(head, todo)
    pool: OrderedPool | InlinePool = (
        InlinePool(options)
        if small
        else OrderedPool(workers, options, max_pending=workers * 4, warm_inline=spec.inline_below > 0)
    )
    ctx = WriteContext(model_id=model_id, store_bytes=spec.store_bytes, matcher=IndexPhashMatcher(index), job_id=job_id)
    stages = Stages(database, embedder, ctx, index, progress, spec.batch_size, on_progress)
    batch: list[Processed] = []
    skipped = 0
    feed_seconds = 0.0
    status = "completed"

    def collect(block: bool) -> None:
        nonlocal batch, skipped
        while len(pool) and (block or pool.head_ready()):
            t0 = time.perf_counter()
            results = pool.pop()
            stages.seconds["wait_for_workers"] += time.perf_counter() - t0
            batch.extend(results)
            if len(batch) >= spec.batch_size:
                stages.put(stages.to_embed, (batch[: spec.batch_size], skipped))
                batch, skipped = batch[spec.batch_size :], 0
            if block and not pool.full:
                return

    try:
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                chunk = next(todo, None)
                feed_seconds += time.perf_counter() - t0
                if chunk is None:
                    break
                fresh, n_skipped = chunk
                skipped += n_skipped
                for start in range(0, len(fresh), chunk_size):
                    if stop.is_set():
                        break
                    if pool.full:
                        collect(block=True)
                    pool.submit(fresh[start : start + chunk_size])
                    collect(block=False)
            if stop.is_set():
                status = "interrupted"
            collect(block=True)
            while len(pool):
                collect(block=True)
            if batch or skipped:
                stages.put(stages.to_embed, (batch, skipped))
            stages.finish()
        except (Abort, KeyboardInterrupt):
            pool.close(cancel=True)
            if stages.failure is not None:
                raise stages.failure from None
            raise
    except BaseException as exc:
        control.rollback()
        reason = _one_line(exc)
        jobs.mark(job_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", reason[:500])
        control.commit()
        if isinstance(exc, DBAPIError):  # the batch in flight rolled back; everything before it is kept
            raise ImsrcError(
                f"job {job_id} stopped on a database error ({reason}); fix it and run the same "
                "command again to continue"
            ) from exc
        raise
    finally:
        pool.close(cancel=True)
    with database.session() as session:
        sync_search(
            session, database.settings, model_id=model_id, category_ids=stages.touched, embedders=only(embedder)
        )
    if progress.total is not None:
        jobs.set_total(job_id, progress.total)
    jobs.mark(
        job_id,
        status,
        "stopped by the user; run the same command again to continue" if status == "interrupted" else None,
        finished=status == "completed",
    )
    control.commit()
    return status, {**stages.seconds, "scan_and_lookup": feed_seconds}, stages.run_counts


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _count(count: Callable[[], int], progress: JobProgress, on_progress: Callable[[JobProgress], None] | None) -> None:
    try:
        progress.total = count()
    except OSError:
        return
    if on_progress:
        on_progress(progress)


def _todo(
    items: Iterator[WorkItem], jobs: JobRepository, sources: IngestRepository, job_id: int, resumed: bool, control: Any
) -> Iterator[tuple[list[WorkItem], int]]:
    """Chunks of items still to do, and how many were skipped as unchanged. Files this job already
    recorded (before a crash) are left out silently: they were counted then."""
    while True:
        chunk = [item for _, item in zip(range(LOOKUP_CHUNK), items, strict=False)]
        if not chunk:
            return
        keys = [i.key for i in chunk if i.path is not None and i.fail_reason is None]
        done = jobs.done_paths(job_id, [i.key for i in chunk]) if resumed else set()
        known = sources.known_sources(keys) if keys else {}
        control.commit()
        fresh: list[WorkItem] = []
        skipped = 0
        for item in chunk:
            if item.key in done:
                continue
            src = known.get(item.key)
            if src is not None and item.path is not None and _unchanged(item.path, src.byte_size, src.mtime_ns):
                skipped += 1
                continue
            fresh.append(item)
        yield fresh, skipped


def _unchanged(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns
