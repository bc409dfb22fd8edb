"""uvicorn's h11 protocol with read deadlines for slow clients (slowloris).

uvicorn closes a connection that idles *between* requests (timeout_keep_alive) but sets no limit on how long a
client may take to send a request: a connection that sends one header byte a second, or a body that stalls,
stays open for ever, and enough of them use up the server's sockets and file descriptors. Here a request's head
(request line and headers) must be complete within `read_timeout_s` of when the server began waiting for it
(connection opened, or the previous response finished), and a body may not stall longer than that while the
server is reading it. Either way the connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, read_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self._tick = min(1.0, read_timeout_s / 4)
        self._head_deadline: float | None = None
        self._last_data = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_data = self.loop.time()
        self._head_deadline = self._last_data + self.read_timeout_s
        self._watchdog = self.loop.call_later(self._tick, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The wait for the next request head begins now. The watchdog alone cannot tell: a keep-alive connection
        # whose requests each finish between two of its ticks always looks idle to it, so the deadline set at
        # connect was never moved and a busy connection was closed 10 s after it opened, under a client about
        # to send on it (bench/load: httpx ReadError / "Server disconnected" mid-run).
        self._head_deadline = self.loop.time() + self.read_timeout_s

    def _check(self) -> None:
        self._watchdog = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        state = self.conn.their_state
        too_slow = False
        if state is h11.IDLE:
            # Waiting for a request head; the wait began at connect or when the last response was done.
            if self._head_deadline is None:
                self._head_deadline = now + self.read_timeout_s
            too_slow = now > self._head_deadline
        else:
            self._head_deadline = None
            # Reading a body: only the client's own stalls count, not pauses while the app is not reading.
            too_slow = (
                state is h11.SEND_BODY and not self.flow.read_paused and now - self._last_data > self.read_timeout_s
            )
        if too_slow:
            self.logger.info(
                "closing a connection from %s: request not received within %g s", self.client, self.read_timeout_s
            )
            self.transport.close()
            return
        self._watchdog = self.loop.call_later(self._tick, self._check)
