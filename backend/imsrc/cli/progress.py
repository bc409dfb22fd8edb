"""A Rich progress bar for ingest jobs: files/s, ETA and live outcome counts, on stderr."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from imsrc.cli.output import err_console

if TYPE_CHECKING:
    from imsrc.ingest.pipeline import JobProgress


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} files/s" if speed else "-- files/s", style="cyan")


class JobBar:
    """Callable as the pipeline's on_progress (called from its writer thread; Rich locks internally)."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn(
                "new {task.fields[new]} dup {task.fields[duplicate]} linked {task.fields[linked]}"
                " skipped {task.fields[skipped]} [red]failed {task.fields[failed]}"
            ),
            console=err_console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            description, total=None, start=True, new=0, duplicate=0, linked=0, skipped=0, failed=0
        )
        self._first: int | None = None

    def __call__(self, state: JobProgress) -> None:
        if self._first is None:  # a resumed job starts where it stopped; the rate counts this run only
            self._first = state.done
            self.progress.update(self.task, completed=state.done)
        counts: dict[str, Any] = dict(state.counts)
        self.progress.update(self.task, completed=state.done, total=state.total, **counts)

    def __enter__(self) -> JobBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


@contextmanager
def ctrl_c_stops(stop: threading.Event, what: str = "the current batch") -> Iterator[None]:
    """First Ctrl-C: finish cleanly after `what`. Second Ctrl-C: stop now (the open batch rolls back)."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print(f"stopping after {what} (Ctrl-C again to abort at once)")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling, stop still works via the event
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
