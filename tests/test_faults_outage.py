"""Restart the database under a running server: 503 with a clear message during the outage, then recovery
without restarting the server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, run_cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def live_server(scratch: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_") or k == "IMSRC_INFERENCE"}
    env.update(IMSRC_DATA_DIR=str(scratch / "data"), IMSRC_MODEL="open_clip-tiny-test")
    port = _free_port()
    # The log goes to a file: a pipe nobody reads fills after 64 KB of log lines and then blocks the server.
    log = (scratch / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        log.close()
        raise AssertionError((scratch / "server.log").read_text(errors="replace") or "server did not start")
    yield base, env
    proc.terminate()
    proc.wait(10)
    log.close()


def test_database_restart_under_running_server(live_server: tuple[str, dict[str, str]]) -> None:
    base, env = live_server
    assert httpx.get(base + "/api/status").status_code == 200
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
