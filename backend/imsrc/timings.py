"""Where a request's time goes: named stages summed per request, sent back as a Server-Timing header.

An upload under load is slow for reasons its total alone does not show (waiting for a thread or a CPU slot,
decoding, the model, a lock another writer holds, the commit). The route opens `collect()`; code anywhere below
it marks `stage("name")`. Outside a collecting request `stage` only reads a context variable, so the CLI and the
tests pay nothing. The context variable reaches threadpool threads because anyio runs them in a copy of the
caller's context, and the StageTimes object in it is shared, not copied.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class StageTimes:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + seconds * 1000

    def header(self) -> str:
        """Server-Timing (W3C): `name;dur=milliseconds`, comma-separated, in the order first seen."""
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.ms.items())


_current: ContextVar[StageTimes | None] = ContextVar("imsrc_stage_times", default=None)


@contextmanager
def collect() -> Iterator[StageTimes]:
    times = StageTimes()
    token = _current.set(times)
    try:
        yield times
    finally:
        _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    times = _current.get()
    if times is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - started)


def record(name: str, seconds: float) -> None:
    """A duration measured elsewhere (a queue wait: from submitting work to its start)."""
    times = _current.get()
    if times is not None:
        times.add(name, seconds)
