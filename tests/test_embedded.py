"""The embedded server: on-demand start, one per data directory, crash recovery, clear errors."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from imsrc.db.embedded import EmbeddedServer
from tests.helpers import run_cli


def _env(data_dir: Path) -> dict[str, str]:
    return {"IMSRC_DATA_DIR": str(data_dir)}


@pytest.fixture()
def data_dir(scratch: Path) -> Path:
    return scratch / "data"


def test_sigkill_then_any_command_brings_it_back_with_data(data_dir: Path) -> None:
    env = _env(data_dir)
    assert run_cli("migrate", env=env).returncode == 0
    server = EmbeddedServer(data_dir)
    info = server.info()
    assert info is not None
    with psycopg.connect(info.url(), autocommit=True) as conn:
        conn.execute("INSERT INTO categories (name) VALUES ('survivor')")
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while server.info() is not None and time.time() < deadline:
        time.sleep(0.1)
    assert server.info() is None
    # The next command starts the server again, recovering from the crash and the stale postmaster.pid.
    result = run_cli("sql", "SELECT name FROM catalog_categories", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"name": "survivor"}]
    new_info = server.info()
    assert new_info is not None and new_info.pid != info.pid


def test_concurrent_starts_share_one_server(data_dir: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda _: EmbeddedServer(data_dir).start(), range(4)))
    assert len({i.pid for i in infos}) == 1
    # And from two processes at once.
    EmbeddedServer(data_dir).stop()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_cli("db", "start", "--json", env=_env(data_dir)), range(2)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({json.loads(r.stdout)["pid"] for r in results}) == 1


def test_stale_pid_file_is_recovered(data_dir: Path) -> None:
    server = EmbeddedServer(data_dir)
    server.start()
    server.stop()
    pid_file = server.pgdata / "postmaster.pid"
    # A postmaster.pid naming a process that is not ours (pid 1 is init, never our postgres).
    pid_file.write_text(f"1\n{server.pgdata}\n0\n5432\n\n\n0 0\nready\n")
    assert server.info() is None
    assert server.start().pid != 1


def test_db_status_and_stop_report(data_dir: Path) -> None:
    env = _env(data_dir)
    status = run_cli("db", "status", "--json", env=env)
    assert json.loads(status.stdout)["running"] is False
    run_cli("db", "start", env=env)
    assert json.loads(run_cli("db", "status", "--json", env=env).stdout)["running"] is True
    url = run_cli("db", "url", env=env).stdout.strip()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert json.loads(run_cli("db", "stop", "--json", env=env).stdout)["stopped"] is True


def test_external_url_makes_db_commands_a_report() -> None:
    result = run_cli("db", "start", "--json", env={"IMSRC_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"})
    assert result.returncode == 0
    assert json.loads(result.stdout)["embedded"] is False


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"IMSRC_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/imsrc"}, "IMSRC_DATABASE_URL"),
        ({"IMSRC_DATABASE_URL": "mysql://root@localhost/db"}, "must be a postgresql:// URL"),
        ({"IMSRC_DATABASE_URL": "::not a url::"}, "not a valid database URL"),
        ({"IMSRC_DATA_DIR": "/proc/imsrc-cannot-write"}, "IMSRC_DATA_DIR"),
        ({"IMSRC_EMBEDDED_PORT": "not-a-port"}, "IMSRC_EMBEDDED_PORT"),
    ],
)
def test_bad_configuration_gets_one_line_error(env: dict[str, str], needle: str) -> None:
    result = run_cli("stats", env=env, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def test_port_in_use_is_a_clear_error(scratch: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("db", "start", env={"IMSRC_DATA_DIR": str(scratch / "d"), "IMSRC_EMBEDDED_PORT": str(port)})
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "IMSRC_EMBEDDED_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_shared_buffers_follow_the_setting(data_dir: Path) -> None:
    from imsrc.config import Settings
    from imsrc.db.embedded import SHARED_BUFFERS_MAX_MB, SHARED_BUFFERS_MIN_MB, resolve_shared_buffers, server_for

    auto = resolve_shared_buffers("auto")
    assert auto.endswith("MB") and SHARED_BUFFERS_MIN_MB <= int(auto[:-2]) <= SHARED_BUFFERS_MAX_MB
    settings = Settings(data_dir=data_dir, embedded_shared_buffers="160MB", _env_file=None)  # type: ignore[call-arg]
    server = server_for(settings)
    try:
        with psycopg.connect(server.start().url(), autocommit=True) as conn:
            assert conn.execute("SHOW shared_buffers").fetchone() == ("160MB",)
    finally:
        server.stop()
    with pytest.raises(ValueError):
        Settings(embedded_shared_buffers="lots", _env_file=None)  # type: ignore[call-arg]
