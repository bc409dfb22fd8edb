"""DerivedRefresher: the stage-1 calibration and predicted labels, refreshed after uploads in a background thread.

An upload commits its images, vectors, thumbnails and the prototypes of the categories it touched (what search
needs to find them); what is derived from the prototypes and only advisory (the calibrated stage-1 temperature,
predicted labels of uncategorised images) it leaves to this refresher (sync_search(defer_derived=True)). The
requests of a burst are coalesced: the thread waits `delay_s` after the first one, then refreshes once for all of
them in its own unit of work, so a catalogue upload of 1,000 files into named categories re-labels the
uncategorised images a few times instead of 1,000 times, and never inside an upload's transaction.

Per server process. Best effort: a refresh that fails is logged and the next upload asks again; a process that
stops runs what is pending first (close(), from the app's lifespan), and the next write's sync or `imsrc`
command brings anything still stale up to date.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.search.sync import refresh_derived

log = logging.getLogger(__name__)


class DerivedRefresher:
    def __init__(self, database: Callable[[], Database], settings: Settings, *, delay_s: float) -> None:
        self._database = database  # looked up when needed: the app opens its database in the lifespan
        self.settings = settings
        self.delay_s = delay_s
        self._pending: set[int] = set()
        self._busy = False
        self._closing = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.runs = 0  # refreshes done (tests, /metrics-style curiosity)

    def request(self, model_id: int) -> None:
        with self._changed:
            self._pending.add(int(model_id))
            if self._thread is None or not self._thread.is_alive():
                # A daemon: a process killed outright loses only advisory work (see the module doc).
                self._thread = threading.Thread(target=self._loop, name="imsrc-derived-refresh", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def idle(self) -> bool:
        with self._changed:
            return not self._pending and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is pending or running (tests; close)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Run what is pending now, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # closing, nothing left
                # Let the rest of a burst arrive (cut short when the process is stopping).
                self._changed.wait_for(lambda: self._closing, self.delay_s)
                todo, self._pending = sorted(self._pending), set()
                self._busy = True
            try:
                for model_id in todo:
                    self._refresh(model_id)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _refresh(self, model_id: int) -> None:
        try:
            with self._database().session() as session:
                report = refresh_derived(session, self.settings, model_id=model_id)
            self.runs += 1
            log.debug("refreshed derived search state for model %s: %s", model_id, report.as_dict())
        except Exception:  # logged: the next upload asks again, and every other write path syncs in full
            log.exception("refreshing the calibration and predicted labels of model %s failed", model_id)
