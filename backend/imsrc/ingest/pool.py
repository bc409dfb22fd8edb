"""An ordered, bounded map over worker processes that survives a worker crashing on a poisoned file."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from imsrc.ingest.decode import DecodeOptions, Processed, WorkItem, init_worker, process, process_chunk

CRASH_REASON = "the decoder crashed on this file (worker process died)"


def _ready() -> bool:
    return True


class OrderedPool:
    """submit() chunks, then results() in submission order. At most max_pending chunks are in flight, so
    memory stays flat however many files there are. Spawned (not forked) workers: the parent has torch
    and its thread pools loaded, which do not survive fork safely. Spawned workers import torch, which
    takes seconds (tens on a loaded machine); until the first one is ready, chunks are decoded in this
    process instead, so the model has work from the first second."""

    def __init__(self, workers: int, options: DecodeOptions, max_pending: int, *, warm_inline: bool = True) -> None:
        self.workers, self.options, self.max_pending = workers, options, max_pending
        self.warm_inline = warm_inline
        # (future, chunk) for chunks sent to workers; (None, results) for chunks decoded here.
        self._pending: deque[tuple[Future[list[Processed]] | None, list[Any]]] = deque()
        self._executor: ProcessPoolExecutor | None = None  # started on first use: a job may have nothing to do
        self._warm: Future[bool] | None = None
        self.inline_chunks = 0

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(self.options,),
        )
        self._warm = executor.submit(_ready)
        return executor

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_pending

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, chunk: list[WorkItem]) -> None:
        if self._executor is None:
            self._executor = self._start()
        if self.warm_inline and self._warm is not None and not self._warm.done():
            self._pending.append((None, [process(item, self.options) for item in chunk]))
            self.inline_chunks += 1
            return
        self._warm = None
        self._pending.append((self._executor.submit(process_chunk, chunk), chunk))

    def head_ready(self) -> bool:
        if not self._pending:
            return False
        future = self._pending[0][0]
        return future is None or future.done()

    def pop(self) -> list[Processed]:
        """The oldest chunk's results (waits for them)."""
        future, chunk = self._pending.popleft()
        if future is None:
            return chunk
        try:
            return future.result()
        except BrokenProcessPool:
            return self._recover(chunk)

    def _recover(self, chunk: list[WorkItem]) -> list[Processed]:
        # Which file killed the worker is unknown: redo the failed chunk and everything in flight one file
        # per task on a fresh pool; a file that breaks the pool again on its own is the culprit.
        rest = [(f, c) for f, c in self._pending]
        self._pending.clear()
        self.close(cancel=True)
        self._executor = self._start()
        results = [self._run_alone(item) for item in chunk]
        for f, c in rest:
            if f is None:
                self._pending.append((None, c))  # decoded here already
            else:
                self._submit_to_workers(c)
        return results

    def _submit_to_workers(self, chunk: list[WorkItem]) -> None:
        assert self._executor is not None
        self._pending.append((self._executor.submit(process_chunk, chunk), chunk))

    def _run_alone(self, item: WorkItem) -> Processed:
        # Through a worker even while the fresh pool starts: a file that crashes the decoder must not be
        # decoded in this process.
        try:
            assert self._executor is not None
            return self._executor.submit(process_chunk, [item]).result()[0]
        except BrokenProcessPool:
            self.close(cancel=True)
            self._executor = self._start()
            return Processed(key=item.key, category=item.category, path=item.path, ok=False, reason=CRASH_REASON)

    def drain(self) -> Iterator[list[Processed]]:
        while self._pending:
            yield self.pop()

    def close(self, *, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self._executor = None


class InlinePool:
    """The same interface, run in this process: for small jobs, where starting worker processes (which
    import torch) would take longer than the work."""

    max_pending = 1
    full = False

    def __init__(self, options: DecodeOptions) -> None:
        from imsrc.ingest.decode import process

        self._process = process
        self.options = options
        self._pending: deque[list[Processed]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, chunk: list[WorkItem]) -> None:
        self._pending.append([self._process(item, self.options) for item in chunk])

    def head_ready(self) -> bool:
        return bool(self._pending)

    def pop(self) -> list[Processed]:
        return self._pending.popleft()

    def close(self, *, cancel: bool = False) -> None:
        self._pending.clear()
