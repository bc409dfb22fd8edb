"""The pool pings a connection only when it has sat unused (engine.PING_AFTER_IDLE_S): a busy pool spends no round
trip per request on it, and a connection the server dropped while it sat in the pool is replaced, not handed out."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.db import engine as engine_module
from imsrc.db.engine import make_engine


def _pid(session: Session) -> int:
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_only_an_idle_connection_is_pinged_and_a_dropped_one_is_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.5)
    engine = make_engine(database_url, pool_size=1)
    pings: list[str] = []
    real_ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        try:
            alive = real_ping(dbapi_connection)
        except Exception:
            pings.append("failed")
            raise
        pings.append("alive" if alive else "dead")
        return alive

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        pids = []
        for _ in range(5):  # back in use at once: the same backend, never pinged
            with Session(engine) as session:
                pids.append(_pid(session))
        assert len(set(pids)) == 1 and pings == []

        time.sleep(0.6)  # idle: pinged once, alive, the same backend
        with Session(engine) as session:
            assert _pid(session) == pids[0]
        assert pings == ["alive"]

        # Dropped by the server while it sat in the pool: the ping finds it dead and the checkout gets a new one.
        with make_engine(database_url).connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pids[0]})
        time.sleep(0.6)
        with Session(engine) as session:
            assert _pid(session) != pids[0]
        assert pings == ["alive", "failed"]
    finally:
        engine.dispose()
