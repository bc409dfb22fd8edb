"""The embed and writer threads of a job, and the bounded queues between them (see pipeline.py)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.ingest.decode import Processed
from imsrc.ingest.phash import PhashIndex
from imsrc.ingest.repository import IngestRepository, JobRepository
from imsrc.ingest.service import OUTCOMES, WriteContext, embed_processed, write_batch

if TYPE_CHECKING:
    from imsrc.ingest.pipeline import JobProgress


class Abort(Exception):
    """Raised in a stage when another stage has failed."""


class Stages:
    """The embed and writer threads, and the bounded queues between them."""

    def __init__(
        self,
        database: Database,
        embedder: Embedder,
        ctx: WriteContext,
        index: PhashIndex,
        progress: JobProgress,
        batch_size: int,
        on_progress: Callable[[JobProgress], None] | None,
    ) -> None:
        self.database, self.embedder, self.ctx, self.index = database, embedder, ctx, index
        self.progress, self.batch_size, self.on_progress = progress, batch_size, on_progress
        self.to_embed: queue.Queue[tuple[list[Processed], int] | None] = queue.Queue(maxsize=2)
        self.to_write: queue.Queue[tuple[list[Processed], int] | None] = queue.Queue(maxsize=2)
        self.failure: BaseException | None = None
        self.touched: set[int] = set()
        self.run_counts = dict.fromkeys(OUTCOMES, 0)
        self.seconds = {"embed": 0.0, "write": 0.0, "wait_for_workers": 0.0}
        self.threads = [
            threading.Thread(target=self._guard, args=(self._embed,), name="imsrc-embed", daemon=True),
            threading.Thread(target=self._guard, args=(self._write,), name="imsrc-write", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            if self.failure is not None:
                raise Abort
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Abort:
            pass  # another stage failed first; its exception is the one to report
        except BaseException as exc:  # surfaced by the main thread
            if self.failure is None:
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
            while t.is_alive() and self.failure is None:
                t.join(0.2)
        if self.failure is not None:
            raise self.failure
