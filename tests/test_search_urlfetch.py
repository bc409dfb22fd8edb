"""URL fetch for image search: schemes, private addresses, redirects, size and time limits (a real local server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imsrc.search.errors import UrlFetchError, UrlNotAllowedError
from imsrc.search.urlfetch import check_url, fetch_image_bytes
from tests.helpers import make_image

PNG = make_image(1)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/img.png":
            self._send(200, PNG, "image/png")
        elif self.path == "/big":
            self._send(200, b"x" * 5000, "image/png")
        elif self.path.startswith("/hop"):
            n = int(self.path[4:] or 0)
            self.send_response(302)
            self.send_header("Location", f"/hop{n + 1}" if n < 10 else "/img.png")
            self.end_headers()
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/one-redirect":
            self.send_response(301)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[fd00::1]/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://100.64.0.1/",
    ],
)
def test_private_loopback_and_metadata_addresses_are_refused(url: str) -> None:
    with pytest.raises(UrlNotAllowedError, match="refusing"):
        check_url(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.org/x.png",
        "gopher://x/",
        "/relative.png",
        "http://user:pw@example.org/x.png",
    ],
)
def test_only_plain_http_and_https_urls(url: str) -> None:
    with pytest.raises(UrlNotAllowedError):
        check_url(url, allow_private=False)


def test_fetch_from_an_allowed_private_server(server: str) -> None:
    assert fetch_image_bytes(f"{server}/img.png", timeout_s=5, max_bytes=10**6, allow_private=True) == PNG
    assert fetch_image_bytes(f"{server}/one-redirect", timeout_s=5, max_bytes=10**6, allow_private=True) == PNG


def test_local_server_refused_by_default(server: str) -> None:
    with pytest.raises(UrlNotAllowedError):
        fetch_image_bytes(f"{server}/img.png", timeout_s=5, max_bytes=10**6, allow_private=False)


def test_redirect_limits_and_redirect_targets_are_checked(server: str) -> None:
    with pytest.raises(UrlFetchError, match="too many redirects"):
        fetch_image_bytes(f"{server}/hop0", timeout_s=5, max_bytes=10**6, allow_private=True)
    # Every hop is validated like the first URL: a redirect to file:// is refused.
    with pytest.raises(UrlNotAllowedError, match="only http and https"):
        fetch_image_bytes(f"{server}/to-file", timeout_s=5, max_bytes=10**6, allow_private=True)


def test_size_and_time_limits(server: str) -> None:
    with pytest.raises(UrlFetchError, match="larger than 1000 bytes"):
        fetch_image_bytes(f"{server}/big", timeout_s=5, max_bytes=1000, allow_private=True)
    started = time.monotonic()
    with pytest.raises(UrlFetchError, match="longer than"):
        fetch_image_bytes(f"{server}/slow", timeout_s=0.5, max_bytes=10**6, allow_private=True)
    assert time.monotonic() - started < 2.5
    with pytest.raises(UrlFetchError, match="HTTP 404"):
        fetch_image_bytes(f"{server}/missing", timeout_s=5, max_bytes=10**6, allow_private=True)
