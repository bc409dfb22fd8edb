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
from imsrc.db.embedded import EmbeddedServer, ServerInfo, _exe
from imsrc.db.engine import upgrade
from imsrc.db.session import Database
from imsrc.errors import BusyError, ConfigurationError, DatabaseUnavailableError
from imsrc.search.errors import UrlFetchError
from imsrc.search.urlfetch import UrlFetcher, fetch_image_bytes
from tests.fixtures.servers import free_port
from tests.helpers import make_image, run_cli

TRUST_EVERYTHING_HBA = """\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
"""


def _start(server: EmbeddedServer) -> ServerInfo:
    """server.start() on server.port, moving to another free port when that one was taken since it was chosen
    (free_port picks a free port; it cannot reserve it, and a restart gives anyone on the machine time to bind it)."""
    for attempt in range(4):
        try:
            return server.start()
        except (ConfigurationError, DatabaseUnavailableError) as exc:
            if attempt == 3 or not any(word in str(exc).lower() for word in ("in use", "could not bind")):
                raise
            server.port = free_port()
    raise AssertionError("unreachable")


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
    for _attempt in range(4):  # another port if the chosen one was taken before the server bound it
        port = free_port()
        env = {"IMSRC_DATA_DIR": str(data_dir), "IMSRC_EMBEDDED_PORT": str(port)}
        result = run_cli("db", "url", env=env)
        if "already in use" not in result.stderr:
            break
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
    server = EmbeddedServer(data_dir, port=free_port())
    info = _start(server)
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
    server = EmbeddedServer(scratch / "data", port=free_port())
    info = _start(server)
    with psycopg.connect(info.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
        conn.execute("ALTER ROLE postgres PASSWORD NULL")
    server.stop()
    _make_old_style(server)
    # The port was free when chosen, not reserved: between stop and start anything on the machine may take it
    # (this test once failed so). _start moves to another port then; the check below uses the one it got.
    info = _start(server)
    assert info.port == server.port
    assert _refused(_tcp_url_without_password(info.port))
    with psycopg.connect(info.url()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("still here",)]
    assert (server.pgdata / "pg_hba.conf.before-imsrc").read_text() == TRUST_EVERYTHING_HBA


def test_running_old_server_is_upgraded_live(scratch: Path) -> None:
    server = EmbeddedServer(scratch / "data", port=free_port())
    info = _start(server)
    port = info.port
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

    server = EmbeddedServer(scratch / "data", port=free_port())
    info = _start(server)
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


def test_api_answers_busy_with_retry_after(
    slow_server: str, settings: Settings, database: Database, session: Session
) -> None:
    changed = settings.model_copy(
        update={"url_fetch_allow_private": True, "url_fetch_concurrency": 1, "url_fetch_timeout_s": 2.0}
    )
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


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/",
        "http://[zzz]/",
        "http://" + "a" * 300 + ".example/x.png",
        "http://" + "b" * 64 + ".example/",
        "http://exa mple.org/",
    ],
)
def test_malformed_urls_are_a_json_4xx(url: str, client: TestClient) -> None:
    response = client.post("/api/search/image", json={"url": url})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"] in ("url_not_allowed", "url_fetch_failed")


# ---------------------------------------------------------------------------------------------- malformed requests
@pytest.mark.parametrize("path", ["/api/images", "/api/search/image"])
@pytest.mark.parametrize("boundary", ["b" * 10_000, "b" * 257])
def test_odd_multipart_boundaries_are_a_json_4xx(client: TestClient, path: str, boundary: str) -> None:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode("latin-1")
        + make_image(3)
        + f"\r\n--{boundary}--\r\n".encode("latin-1")
    )
    response = client.post(path, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
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
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "secret" not in error["message"]


# ---------------------------------------------------------------------------------------------- Host and Origin
def _app_client(settings: Settings, database: Database, session: Session, **changes: object) -> TestClient:
    app = create_app(settings.model_copy(update=changes), database=database)
    app.dependency_overrides[get_session] = lambda: session
    return TestClient(app, base_url="http://127.0.0.1:8000")


@pytest.mark.parametrize(
    "host",
    [
        "rebind.example",
        "rebind.example:8000",
        "127.0.0.1.nip.io",
        "evil.localhost.com",
        "[::1",
        "a b",
        "127.0.0.1:80:80",
        "",
    ],
)
def test_foreign_host_names_are_refused(settings: Settings, database: Database, session: Session, host: str) -> None:
    with _app_client(settings, database, session, allowed_hosts=[]) as c:
        for method, path in (("GET", "/api/categories"), ("GET", "/health"), ("GET", "/"), ("POST", "/api/categories")):
            response = c.request(method, path, headers={"Host": host}, json={"name": "rebound"})
            assert response.status_code == 400, (method, path, response.text)
            assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8000",
        "localhost:8000",
        "LOCALHOST",
        "[::1]:8000",
        "10.1.2.3",
        "imsrc.localhost:8000",
        "images.example.org",
        "a.b.example.net",
    ],
)
def test_own_host_names_pass(settings: Settings, database: Database, session: Session, host: str) -> None:
    with _app_client(settings, database, session, allowed_hosts=["images.example.org", "*.example.net"]) as c:
        assert c.get("/api/categories", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "http://127.0.0.1:9999"},  # another local origin (another port)
        {"Origin": "http://localhost:8000"},  # same machine, but not this page's origin
        {"Origin": "null"},
        {"Referer": "https://evil.example/page.html"},
        {"Origin": "https://evil.example", "Referer": "http://127.0.0.1:8000/"},
    ],
)
def test_cross_origin_writes_are_refused(
    settings: Settings, database: Database, session: Session, headers: dict[str, str]
) -> None:
    with _app_client(settings, database, session) as c:
        # A no-cors form post: urlencoded or multipart, and a JSON one, a search and a delete.
        for method, path, kwargs in (
            ("POST", "/api/categories", {"json": {"name": "planted"}}),
            ("POST", "/api/images", {"files": {"file": ("x.png", make_image(5), "image/png")}}),
            ("POST", "/api/search/image", {"files": {"file": ("x.png", make_image(5), "image/png")}}),
            ("DELETE", "/api/images/1", {}),
        ):
            response = c.request(method, path, headers=headers, **kwargs)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "origin_not_allowed"
        assert "planted" not in {cat["name"] for cat in c.get("/api/categories").json()}


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, scripts: no Origin, no Referer
        {"Origin": "http://127.0.0.1:8000"},  # the page itself
        {"Referer": "http://127.0.0.1:8000/#/upload"},
        {"Origin": "https://app.example.com"},  # listed in IMSRC_CORS_ORIGINS
        {"Origin": "https://images.example.org", "Host": "127.0.0.1:8000"},  # behind a proxy that rewrites Host
    ],
)
def test_own_and_allowed_origins_may_write(
    settings: Settings, database: Database, session: Session, headers: dict[str, str]
) -> None:
    with _app_client(
        settings, database, session, cors_origins=["https://app.example.com"], allowed_hosts=["images.example.org"]
    ) as c:
        response = c.post("/api/categories", json={"name": f"ok-{len(headers)}-{sorted(headers)}"}, headers=headers)
        assert response.status_code == 201, response.text


def test_api_key_with_surrounding_whitespace_is_accepted(
    settings: Settings, database: Database, session: Session
) -> None:
    with _app_client(settings, database, session, api_key="s3cret") as c:
        for value in ("s3cret ", " s3cret", "\ts3cret  "):
            response = c.post(
                "/api/categories",
                json={"name": f"k{len(value)}{value.strip()}{value[0] == ' '}"},
                headers={"X-API-Key": value},
            )
            assert response.status_code == 201, (repr(value), response.text)
        assert c.post("/api/categories", json={"name": "no"}, headers={"X-API-Key": "s3cre"}).status_code == 403


# ---------------------------------------------------------------------------------------------- browser headers
def test_page_api_and_docs_carry_hardening_headers(client: TestClient) -> None:
    for path in ("/", "/index.html", "/api/categories", "/health", "/docs", "/openapi.json", "/api/nope"):
        response = client.get(path)
        csp = response.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, path
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "same-origin", path
    page_csp = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in page_csp and "unsafe-inline" not in page_csp.split("script-src")[1].split(";")[0]
    assert "sandbox" in client.get("/api/categories").headers["content-security-policy"]


def test_docs_load_pinned_local_assets_only(client: TestClient) -> None:
    import base64
    import hashlib
    import re

    assert client.get("/redoc").status_code == 404  # it loaded its logo from a CDN
    for path in ("/docs",):
        page = client.get(path)
        assert page.status_code == 200
        html = page.text
        assert "cdn." not in html and "https://" not in html and "//fonts" not in html
        tags = re.findall(r'<(?:script|link rel="stylesheet")[^>]*>', html)
        assert tags and not re.search(r"<script>\s*\S", html)  # no inline script
        for tag in tags:
            src = re.search(r'(?:src|href)="([^"]+)"', tag)
            integrity = re.search(r'integrity="sha384-([^"]+)"', tag)
            assert src and integrity, tag
            body = client.get(src.group(1))
            assert body.status_code == 200, src.group(1)
            assert base64.b64encode(hashlib.sha384(body.content).digest()).decode() == integrity.group(1)
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")


# ---------------------------------------------------------------------------------------------- slow clients
@pytest.fixture(scope="module")
def served(create_database) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`imsrc serve` (the real uvicorn server) with a 2-second client timeout."""
    import tempfile

    from tests.browser_support import running_server

    url = create_database("imsrc_slow")
    upgrade(url)
    with (
        tempfile.TemporaryDirectory(prefix="imsrc-slow-") as tmp,
        running_server(url, Path(tmp), extra_env={"IMSRC_CLIENT_TIMEOUT_S": "2"}) as base,
    ):
        yield base


def _closed_within(sock: object, trickle: list[bytes], limit: float) -> float | None:
    """Send `trickle` one piece every 0.3 s (then nothing); the seconds until the server closed, or None."""
    import socket as socketlib

    assert isinstance(sock, socketlib.socket)
    sock.settimeout(0.3)
    started = time.monotonic()
    pieces = list(trickle)
    while time.monotonic() - started < limit:
        try:
            if pieces:
                sock.sendall(pieces.pop(0))
            data = sock.recv(4096)
            if data == b"":
                return time.monotonic() - started
            if data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 5"):
                continue  # an error answer before closing is fine too
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


@pytest.mark.parametrize("case", ["slow-headers", "silent", "stalled-body"])
def test_slow_clients_are_disconnected(served: str, case: str) -> None:
    import socket as socketlib

    port = int(served.rsplit(":", 1)[1])
    head = b"POST /api/categories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    trickle = {
        # One header line every 0.3 s, for ever: each read is quick, the request never completes.
        "slow-headers": [b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"] + [b"X-A: b\r\n"] * 100,
        "silent": [],
        "stalled-body": [head + b"Content-Length: 100\r\n\r\n" + b'{"name": '],
    }[case]
    with socketlib.create_connection(("127.0.0.1", port)) as sock:
        closed_after = _closed_within(sock, trickle, limit=8.0)
    assert closed_after is not None, f"{case}: still open after 8 s"
    assert closed_after < 5.0
    # A prompt client is unaffected.
    with socketlib.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_busy_keep_alive_connection_stays_open(served: str) -> None:
    """Quick requests on one keep-alive connection, 0.3 s apart, for 3x the 2 s client timeout: every one is
    answered. Each finishes between two watchdog ticks, so the watchdog only ever saw the connection idle and,
    before the deadline moved with each response, closed it 2 s after it opened (a client about to send on it
    got a reset: httpx ReadError in bench/load)."""
    import socket as socketlib

    port = int(served.rsplit(":", 1)[1])
    answered = 0
    with socketlib.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        while time.monotonic() - started < 6.0:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, f"closed by the server after {time.monotonic() - started:.1f} s, {answered} answers"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            answered += 1
            time.sleep(0.3)
    # The loop ran 6 s (3x the timeout) on one connection that never closed; the count only shows the requests were
    # spread over it (not a fixed figure: under load each answer may take longer than the 0.3 s pause).
    assert answered >= 6


# ---------------------------------------------------------------------------------------------- imsrc sql
def test_sql_prints_every_row_by_default(scratch: Path, database_url: str) -> None:
    env = {"IMSRC_DATABASE_URL": database_url, "IMSRC_DATA_DIR": str(scratch)}
    # main printed the first 100,000 rows and exited 0, silently.
    result = run_cli("sql", "SELECT g FROM generate_series(1, 150000) g", "--csv", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "g" and len(lines) == 150_001 and lines[-1] == "150000"
    as_json = run_cli("sql", "SELECT g, 'x' || g AS s FROM generate_series(1, 2500) g", "--json", env=env)
    assert json.loads(as_json.stdout) == [{"g": i, "s": f"x{i}"} for i in range(1, 2501)]
    assert json.loads(run_cli("sql", "SELECT 1 AS a WHERE false", "--json", env=env).stdout) == []
    # Statements that cannot stand behind a cursor still work; errors mid-stream are one line.
    assert "Result" in run_cli("sql", "EXPLAIN SELECT 1", "--csv", env=env).stdout
    failing = run_cli("sql", "SELECT 1 / (3000 - g) FROM generate_series(1, 5000) g", "--csv", env=env)
    assert failing.returncode == 1 and "division by zero" in failing.stderr and "Traceback" not in failing.stderr
    table = run_cli("sql", "SELECT g FROM generate_series(1, 2500) g", env=env)
    assert table.returncode == 0 and "2500" in table.stdout


def test_sql_limit_is_explicit_and_says_when_it_cut(scratch: Path, database_url: str) -> None:
    env = {"IMSRC_DATABASE_URL": database_url, "IMSRC_DATA_DIR": str(scratch)}
    cut = run_cli("sql", "SELECT g FROM generate_series(1, 50) g", "--csv", "--limit", "10", env=env)
    assert cut.returncode == 0 and cut.stdout.splitlines() == ["g", *[str(i) for i in range(1, 11)]]
    assert "output cut at 10 rows" in cut.stderr
    whole = run_cli("sql", "SELECT g FROM generate_series(1, 10) g", "--json", "--limit", "10", env=env)
    assert len(json.loads(whole.stdout)) == 10 and "cut" not in whole.stderr


def test_sql_memory_stays_flat(scratch: Path, database_url: str) -> None:
    """Peak memory of `imsrc sql` for 3,000 rows and for 1,500,000 wide rows differs by little."""
    import os
    import sys

    from tests.helpers import ROOT

    probe = (
        "import resource, sys\n"
        "from imsrc.cli.main import main\n"
        "sys.argv = ['imsrc', 'sql', sys.argv[1], '--csv']\n"
        "try:\n    main()\nfinally:\n"
        "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_") or k == "IMSRC_INFERENCE"}
    env.update({"IMSRC_DATABASE_URL": database_url, "IMSRC_DATA_DIR": str(scratch)})

    def peak_kb(rows: int) -> int:
        query = f"SELECT g, repeat('x', 200) AS pad FROM generate_series(1, {rows}) g"
        done = subprocess.run(
            [sys.executable, "-c", probe, query],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stderr.split("maxrss")[1].split()[0])

    small, big = peak_kb(3000), peak_kb(1_500_000)
    # Holding the big answer would take well over 300 MB (1.5M tuples of an int and a 200-character string).
    assert big - small < 60_000, (small, big)
