"""Restart the database under a running server: 503 with a clear message during the outage, then recovery
without restarting the server."""

from __future__ import annotations

import httpx

from tests.helpers import run_cli


def test_database_restart_under_running_server(live_server: tuple[str, dict[str, str]]) -> None:
    base, env = live_server
    # A worker's first /api/status took 16-19 s here at load 4-6 (the default 5 s timed out, on main too).
    assert httpx.get(base + "/api/status", timeout=60).status_code == 200
    assert run_cli("db", "stop", env=env).returncode == 0
    during = httpx.get(base + "/api/status", timeout=30)
    assert during.status_code == 503
    assert during.json()["error"]["code"] == "database_unavailable"
    assert "retry" in during.json()["error"]["message"]
    assert httpx.get(base + "/health").status_code == 200  # the process itself is alive
    assert httpx.get(base + "/health/ready", timeout=30).status_code == 503  # but not ready to serve
    assert run_cli("db", "start", env=env).returncode == 0
    after = httpx.get(base + "/api/status", timeout=30)
    assert after.status_code == 200 and after.json()["database"]["reachable"] is True
    assert httpx.get(base + "/health/ready").json()["status"] == "ready"
