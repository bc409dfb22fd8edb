"""Folder jobs: scan -> worker processes -> batched embedding -> batched writes, all stages overlapping.

    main thread     scan, skip what is done, feed the process pool (bounded), collect results in order
    embed thread    one forward pass per batch (torch releases the GIL)
    writer thread   one transaction per batch (write_batch), then progress

Queues between the threads hold at most two batches, so memory stays flat on any number of files.
Commits: the writer commits once per batch; that is what makes a job resumable. Re-running the same
command continues the unfinished job: files it recorded are skipped, and so are paths whose size and
mtime match what the catalog holds. Ctrl-C (the `stop` event) ends the job after the batches in flight."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.errors import ConflictError
from imsrc.ingest.decode import DecodeOptions, Processed, WorkItem
from imsrc.ingest.phash import PhashIndex
from imsrc.ingest.pool import InlinePool, OrderedPool
from imsrc.ingest.repository import IngestRepository, JobRepository
from imsrc.ingest.scan import check_roots, count_files, scan
from imsrc.ingest.service import OUTCOMES, IndexPhashMatcher, WriteContext, embed_processed, ensure_model, write_batch

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
    inline_below: int = 48  # fewer files than this: decode in this process, skip starting workers


def job_key(kind: str, paths: Iterable[str], options: dict[str, Any], model: str) -> str:
    raw = json.dumps([kind, sorted(paths), options, model], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def run_index_job(database: Database, embedder: Embedder, paths: list[str], *, category: str | None = None,
                  category_from_folder: bool = False, store: str = "reference", workers: int = 0,
                  batch_size: int = 32, inline_below: int = 48, stop: threading.Event | None = None,
                  on_progress: Callable[[JobProgress], None] | None = None) -> JobSummary:
    """Index folders/files. Commits once per batch (and to open and close the job): call it from a
    command boundary, never inside another unit of work."""
    roots = check_roots(paths)
    ignored = [0]
    spec = JobSpec(
        kind="index", paths=roots,
        options={"category": category, "category_from_folder": category_from_folder, "store": store},
        items=lambda: scan(roots, category=category, category_from_folder=category_from_folder, counter=ignored),
        count=lambda: count_files(roots), store_bytes=store == "copy", workers=workers, batch_size=batch_size,
        inline_below=inline_below)
    summary = run_job(database, embedder, spec, stop=stop, on_progress=on_progress)
    summary.ignored_files = ignored[0]
    return summary


def resolve_workers(workers: int) -> int:
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _Abort(Exception):
    pass


class _Stages:
    """The embed and writer threads, and the bounded queues between them."""

    def __init__(self, database: Database, embedder: Embedder, ctx: WriteContext, index: PhashIndex,
                 progress: JobProgress, batch_size: int, on_progress: Callable[[JobProgress], None] | None) -> None:
        self.database, self.embedder, self.ctx, self.index = database, embedder, ctx, index
        self.progress, self.batch_size, self.on_progress = progress, batch_size, on_progress
        self.to_embed: queue.Queue[tuple[list[Processed], int] | None] = queue.Queue(maxsize=2)
        self.to_write: queue.Queue[tuple[list[Processed], int] | None] = queue.Queue(maxsize=2)
        self.failure: BaseException | None = None
        self.touched: set[int] = set()
        self.run_counts = dict.fromkeys(OUTCOMES, 0)
        self.seconds = {"embed": 0.0, "write": 0.0, "wait_for_workers": 0.0}
        self.threads = [threading.Thread(target=self._guard, args=(self._embed,), name="imsrc-embed", daemon=True),
                        threading.Thread(target=self._guard, args=(self._write,), name="imsrc-write", daemon=True)]
        for t in self.threads:
            t.start()

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            if self.failure is not None:
                raise _Abort
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # surfaced by the main thread
            self.failure = exc

    def _embed(self) -> None:
        while (job := self.to_embed.get()) is not None:
            t0 = time.perf_counter()
            self._drop_known(job[0])
            embed_processed(self.embedder, job[0], pad_to=self.batch_size)
            self.seconds["embed"] += time.perf_counter() - t0
            self.put(self.to_write, job)
        self.put(self.to_write, None)

    def _drop_known(self, batch: list[Processed]) -> None:
        """Bytes already catalogued with this model's vector will only be linked: skip their forward pass."""
        digests = [p.sha256 for p in batch if p.ok and p.sha256 is not None]
        if not digests:
            return
        with self.database.session() as session:
            known = IngestRepository(session).existing_by_sha(digests, self.ctx.model_id)
        for p in batch:
            if p.sha256 in known and known[p.sha256].has_embedding:
                p.tensor = None

    def _write(self) -> None:
        while (job := self.to_write.get()) is not None:
            batch, skipped = job
            t0 = time.perf_counter()
            with self.database.session() as session:
                result = write_batch(session, self.ctx, batch)
                if skipped and self.ctx.job_id is not None:
                    JobRepository(session).add_counts(self.ctx.job_id, {"skipped": skipped})
            self.seconds["write"] += time.perf_counter() - t0
            for image_id, value in result.new_canonicals:  # only once committed
                self.index.add(image_id, value)
            self.touched |= result.touched_categories
            result.counts["skipped"] += skipped
            for k, v in result.counts.items():
                self.run_counts[k] += v
                self.progress.counts[k] += v
            self.progress.done += len(batch) + skipped
            if self.on_progress:
                self.on_progress(self.progress)

    def finish(self) -> None:
        self.put(self.to_embed, None)
        for t in self.threads:
            while t.is_alive():
                t.join(0.2)
                if self.failure is not None and t.name == "imsrc-embed":
                    break
        if self.failure is not None:
            raise self.failure


def run_job(database: Database, embedder: Embedder, spec: JobSpec, *, stop: threading.Event | None = None,
            on_progress: Callable[[JobProgress], None] | None = None) -> JobSummary:
    stop = stop or threading.Event()
    started = time.monotonic()
    with database.session() as session:
        model = ensure_model(session, embedder)
        model_id, model_name = model.id, model.name
    key = job_key(spec.kind, spec.paths, spec.options, model_name)
    control = database.sessions()  # holds the job's advisory lock for as long as the job runs
    try:
        jobs = JobRepository(control)
        existing = jobs.find_resumable(key)
        if existing is not None and not jobs.try_lock(existing["id"]):
            raise ConflictError(f"job {existing['id']} is being run by another process right now")
        if existing is None:
            job_id = jobs.create(kind=spec.kind, job_key=key, paths=spec.paths,
                                 options={**spec.options, "model": model_name}, model_id=model_id,
                                 model_name=model_name)
            jobs.try_lock(job_id)
        else:
            job_id = existing["id"]
            jobs.mark(job_id, "running")
        control.commit()
        progress = JobProgress(job_id=job_id, resumed=existing is not None)
        if existing is not None:
            for k in OUTCOMES:
                progress.counts[k] = int(existing[f"{k}_count"])
            progress.done = sum(progress.counts.values())
        status, stage_seconds, run_counts = _run(database, embedder, spec, control, job_id, model_id, progress,
                                                 stop, on_progress)
        job = JobRepository(control).get(job_id) or {}
        control.commit()
        counts = {k: int(job.get(f"{k}_count", 0)) for k in OUTCOMES}
        elapsed = time.monotonic() - started
        return JobSummary(job_id=job_id, status=status, resumed=progress.resumed, model=model_name, counts=counts,
                          run_counts=run_counts, ignored_files=0, seconds=round(elapsed, 3),
                          files_per_second=round(sum(run_counts.values()) / elapsed, 2) if elapsed else 0.0,
                          stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()})
    finally:
        control.rollback()
        control.close()


def _run(database: Database, embedder: Embedder, spec: JobSpec, control: Any, job_id: int, model_id: int,
         progress: JobProgress, stop: threading.Event,
         on_progress: Callable[[JobProgress], None] | None) -> tuple[str, dict[str, float], dict[str, int]]:
    jobs, sources = JobRepository(control), IngestRepository(control)
    index = PhashIndex(database.settings.duplicate_threshold, sources.canonical_hashes())
    control.commit()
    if spec.count is not None:
        threading.Thread(target=_count, args=(spec.count, progress, on_progress), daemon=True).start()
    workers = resolve_workers(spec.workers)
    options = DecodeOptions(preprocess=embedder.preprocess, max_pixels=database.settings.max_pixels,
                            thumbnail_size=database.settings.thumbnail_size, keep_bytes=spec.store_bytes)
    chunk_size = max(1, min(16, spec.batch_size // workers))
    todo: Iterator[tuple[list[WorkItem], int]] = _todo(spec.items(), jobs, sources, job_id, progress.resumed,
                                                        control)
    head = list(itertools.islice(todo, 2))
    small = len(head) < 2 and sum(len(fresh) for fresh, _ in head) < spec.inline_below
    todo = itertools.chain(head, todo)
    pool: OrderedPool | InlinePool = InlinePool(options) if small else \
        OrderedPool(workers, options, max_pending=workers * 4)
    ctx = WriteContext(model_id=model_id, store_bytes=spec.store_bytes, matcher=IndexPhashMatcher(index),
                       job_id=job_id)
    stages = _Stages(database, embedder, ctx, index, progress, spec.batch_size, on_progress)
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
                batch, skipped = batch[spec.batch_size:], 0
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
                    pool.submit(fresh[start:start + chunk_size])
                    collect(block=False)
            if stop.is_set():
                status = "interrupted"
            collect(block=True)
            while len(pool):
                collect(block=True)
            if batch or skipped:
                stages.put(stages.to_embed, (batch, skipped))
            stages.finish()
        except (_Abort, KeyboardInterrupt):
            pool.close(cancel=True)
            if stages.failure is not None:
                raise stages.failure from None
            raise
    except BaseException as exc:
        jobs.mark(job_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                  f"{type(exc).__name__}: {exc}"[:500])
        control.commit()
        raise
    finally:
        pool.close(cancel=True)
    with database.session() as session:
        PrototypeRepository(session).recompute_means(stages.touched)
        from imsrc.search.sync import sync_search  # prototypes, automatic categories, indexes, predictions

        sync_search(session, database.settings, model_id=model_id, category_ids=stages.touched, embedder=embedder)
    if progress.total is not None:
        jobs.set_total(job_id, progress.total)
    jobs.mark(job_id, status, "stopped by the user; run the same command again to continue"
              if status == "interrupted" else None, finished=status == "completed")
    control.commit()
    return status, {**stages.seconds, "scan_and_lookup": feed_seconds}, stages.run_counts


def _count(count: Callable[[], int], progress: JobProgress, on_progress: Callable[[JobProgress], None] | None) -> None:
    try:
        progress.total = count()
    except OSError:
        return
    if on_progress:
        on_progress(progress)


def _todo(items: Iterator[WorkItem], jobs: JobRepository, sources: IngestRepository, job_id: int, resumed: bool,
          control: Any) -> Iterator[tuple[list[WorkItem], int]]:
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
