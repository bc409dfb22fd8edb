"""Security at the edges (issue 12): embedded-database logins, URL-fetch deadlines and caps, Host/Origin checks,
error shapes for malformed requests, browser hardening headers, slow clients, `imsrc sql` streaming."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db import embedded_auth
from imsrc.db.embedded import EmbeddedServer, _exe
from imsrc.db.engine import upgrade
from imsrc.db.session import Database
from imsrc.errors import BusyError
from imsrc.search.errors import UrlFetchError
from imsrc.search.urlfetch import UrlFetcher, fetch_image_bytes
from tests.api_helpers import client
from tests.helpers import make_image, run_cli

__all__ = ["client"]

TRUST_EVERYTHING_HBA = """\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tcp_url_without_password(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _refused(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError:
        return True
    return False


# ---------------------------------------------------------------------------------------------- embedded logins
def test_embedded_tcp_needs_the_generated_password(scratch: Path) -> None:
    data_dir = scratch / "data"
    port = _free_port()
    env = {"IMSRC_DATA_DIR": str(data_dir), "IMSRC_EMBEDDED_PORT": str(port)}
    result = run_cli("db", "url", env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert f"127.0.0.1:{port}" in url
    # Before: initdb --auth=trust let any local user in as superuser over TCP.
    assert _refused(_tcp_url_without_password(port))
    assert _refused(f"postgresql://postgres:wrong@127.0.0.1:{port}/postgres")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    secret = embedded_auth.password_file(data_dir.resolve(), "postgres")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_text().strip() in url
    # The socket folder is private: the socket itself is trusted.
    info = EmbeddedServer(data_dir).info()
    assert info is not None and info.socket_dir is not None
    assert stat.S_IMODE(info.socket_dir.stat().st_mode) == 0o700
    # The read-only role still works (over the socket), and the app's commands too.
    sql = run_cli("sql", "SELECT count(*) AS n FROM catalog_categories", "--json", env=env)
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout) == [{"n": 0}]


def test_tcp_only_reader_gets_its_own_password(scratch: Path) -> None:
    """Windows servers have no unix socket: the reader logs in over TCP with a password of its own."""
    import dataclasses

    data_dir = scratch / "data"
    server = EmbeddedServer(data_dir, port=_free_port())
    info = server.start()
    with psycopg.connect(info.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE imsrc_reader LOGIN")
    tcp_only = dataclasses.replace(info, socket_dir=None)
    server.info = lambda: tcp_only  # type: ignore[method-assign]
    url = server.login_url("imsrc_reader")
    assert url.startswith("postgresql://imsrc_reader:") and f":{info.port}/" in url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("imsrc_reader",)
    assert _refused(f"postgresql://imsrc_reader@127.0.0.1:{info.port}/imsrc")


def _make_old_style(server: EmbeddedServer) -> None:
    """What an older imsrc left: pg_hba.conf trusting TCP, no password, no password file."""
    (server.pgdata / "pg_hba.conf").write_text(TRUST_EVERYTHING_HBA)
    embedded_auth.password_file(server.data_dir, "postgres").unlink()


def test_old_data_directory_is_upgraded_on_start_and_keeps_its_data(scratch: Path) -> None:
    port = _free_port()
    server = EmbeddedServer(scratch / "data", port=port)
    info = server.start()
    with psycopg.connect(info.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
        conn.execute("ALTER ROLE postgres PASSWORD NULL")
    server.stop()
    _make_old_style(server)
    info = server.start()
    assert _refused(_tcp_url_without_password(port))
    with psycopg.connect(info.url()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("still here",)]
    assert (server.pgdata / "pg_hba.conf.before-imsrc").read_text() == TRUST_EVERYTHING_HBA


def test_running_old_server_is_upgraded_live(scratch: Path) -> None:
    port = _free_port()
    server = EmbeddedServer(scratch / "data", port=port)
    info = server.start()
    with psycopg.connect(info.url(), autocommit=True) as conn:
        _make_old_style(server)
        conn.execute("SELECT pg_reload_conf()")
    import time

    time.sleep(0.3)
    assert not _refused(_tcp_url_without_password(port))
    again = server.start()
    assert again.pid == info.pid  # not restarted
    assert _refused(_tcp_url_without_password(port))
    with psycopg.connect(again.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_backup_keeps_the_password_off_the_command_line(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imsrc.db import backup

    seen: list[list[str]] = []
    envs: list[dict[str, str] | None] = []
    real_run = subprocess.run

    def spy(cmd: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(list(cmd))
        envs.append(kwargs.get("env"))  # type: ignore[arg-type]
        return real_run(cmd, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    server = EmbeddedServer(scratch / "data", port=_free_port())
    info = server.start()
    assert info.password
    upgrade(info.url())
    monkeypatch.setattr(backup.subprocess, "run", spy)
    backup.backup(info.url(), scratch / "dump.bin")
    dump_cmd = next(cmd for cmd in seen if cmd[0] == _exe("pg_dump"))
    assert info.password not in " ".join(dump_cmd)
    assert any(env and env.get("PGPASSWORD") == info.password for env in envs)


# ---------------------------------------------------------------------------------------------- URL fetches
class _SlowHandler(BaseHTTPRequestHandler):
    """/headers: a status line, then one header line every 0.2 s for 6 s (each read is quick, the whole is not).
    /body: quick headers, then a byte every 0.2 s."""

    def do_GET(self) -> None:
        try:
            if self.path == "/headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
                for i in range(30):
                    self.wfile.write(f"X-Slow-{i}: {i}\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.2)
                self.wfile.write(b"Content-Length: 1\r\n\r\nx")
            else:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("path", ["/headers", "/body"])
def test_one_deadline_covers_headers_and_body(slow_server: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(UrlFetchError, match="longer than"):
        fetch_image_bytes(f"{slow_server}{path}", timeout_s=1.0, max_bytes=10**6, allow_private=True)
    assert time.monotonic() - started < 2.0


def test_concurrent_fetches_are_capped(slow_server: str) -> None:
    fetcher = UrlFetcher(timeout_s=1.5, max_bytes=10**6, allow_private=True, concurrency=2)
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            fetcher.fetch(f"{slow_server}/headers")
        except BaseException as exc:
            errors.append(exc)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    time.sleep(0.3)
    with pytest.raises(BusyError) as busy:
        fetcher.fetch(f"{slow_server}/headers")
    assert busy.value.retry_after == 2
    for t in holders:
        t.join()
    assert all(isinstance(e, UrlFetchError) for e in errors) and len(errors) == 2
    # The slots are free again.
    with pytest.raises(UrlFetchError, match="longer than"):
        fetcher.fetch(f"{slow_server}/headers")


def test_api_answers_busy_with_retry_after(slow_server: str, settings: Settings, database: Database,
                                           session: Session) -> None:
    changed = settings.model_copy(update={"url_fetch_allow_private": True, "url_fetch_concurrency": 1,
                                          "url_fetch_timeout_s": 2.0})
    app = create_app(changed, database=database)
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as api:
        first = threading.Thread(target=lambda: api.post("/api/search/image", json={"url": f"{slow_server}/headers"}))
        first.start()
        time.sleep(0.5)
        response = api.post("/api/search/image", json={"url": f"{slow_server}/headers"})
        first.join()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "busy"


@pytest.mark.parametrize("url", ["http://[::1/", "http://[zzz]/", "http://" + "a" * 300 + ".example/x.png",
                                 "http://" + "b" * 64 + ".example/", "http://exa mple.org/"])
def test_malformed_urls_are_a_json_4xx(url: str, client: TestClient) -> None:
    response = client.post("/api/search/image", json={"url": url})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"] in ("url_not_allowed", "url_fetch_failed")


# ---------------------------------------------------------------------------------------------- malformed requests
@pytest.mark.parametrize("path", ["/api/images", "/api/search/image"])
@pytest.mark.parametrize("boundary", ["b" * 10_000, "b" * 257])
def test_odd_multipart_boundaries_are_a_json_4xx(client: TestClient, path: str, boundary: str) -> None:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode("latin-1") + make_image(3) + f"\r\n--{boundary}--\r\n".encode(
        "latin-1")
    response = client.post(path, content=body,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()


def test_an_unexpected_error_is_a_json_500(settings: Settings, database: Database, session: Session) -> None:
    app = create_app(settings, database=database)

    def boom() -> None:
        raise RuntimeError("internal detail /secret/path")

    app.router.add_api_route("/api/boom", boom)
    app.router.routes.insert(0, app.router.routes.pop())  # before the page's catch-all mount

    with TestClient(app, raise_server_exceptions=False) as api:
        response = api.get("/api/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error",
                                         "message": "the server failed to handle this request"}}
