"""Admission control for searches: at most N run at once in one worker; the rest wait in the event loop.

Why: every search runs its model, its decode and its database work in the threadpool (40 threads). Under a
burst, 40 of them share a worker's one or two cores and its one GIL: each gets a sliver, all finish late
together, and an upload or a listing that arrives behind them waits for a free thread and then shares the CPU
with 40 others (an upload makes ~40 short database round trips, each of which has to win the GIL back). Waiting
here costs nothing (no thread, no connection, no memory beyond the request), searches run in a few at a time at
full speed, and writes and listing, which do not take a slot, find threads and CPU free: a shop's catalogue
upload is not stuck behind its customers' searches (bench/load/run.py --mix issue; BENCHMARKS.md, "Load").
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from imsrc.errors import BusyError

T = TypeVar("T")


class SearchAdmission:
    """`limit` searches at once (0: no limit); a search that waits longer than `wait_s` gets BusyError (503 with
    Retry-After). Created once per app; the semaphore is made in the running event loop on first use (an app
    may be served by several loops in the tests)."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self.waiting = 0

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            for old in [other for other in self._semaphores if other.is_closed()]:
                del self._semaphores[old]
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.limit)
        return semaphore

    async def run(self, func: Callable[..., T], *args: object, **kwargs: object) -> T:
        """func(*args, **kwargs) in the threadpool once a slot is free."""
        if self.limit <= 0:
            return await run_in_threadpool(func, *args, **kwargs)
        semaphore = self._semaphore()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await semaphore.acquire()  # cancelled while being handed a slot, it passes the slot on
        except TimeoutError:
            raise BusyError(
                f"{self.limit} searches are running and more are waiting; retry shortly (IMSRC_SEARCH_CONCURRENCY)",
                retry_after=max(1, math.ceil(self.wait_s / 10)),
            ) from None
        finally:
            self.waiting -= 1
        try:
            return await run_in_threadpool(func, *args, **kwargs)
        finally:
            semaphore.release()
