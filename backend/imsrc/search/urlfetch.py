"""Fetch a query image by URL: http/https only, public addresses only (unless allowed), few redirects,
one deadline for the whole fetch and a size limit on the body, and only a few fetches at once.

The deadline covers name resolution, connecting, TLS, sending, the status line and headers, and the body, on
every redirect hop: httpx's own timeouts apply per socket operation, so a server that sent one header line a
second kept a request (and its worker thread) open without bound. Each socket operation here gets at most the
time left until the deadline.

The host is resolved once, every address is checked, and the connection goes to the checked address (Host
header and TLS SNI keep the name), so a DNS answer that changes between check and connect cannot redirect
the request to an internal address.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from imsrc.config import Settings
from imsrc.errors import BusyError
from imsrc.search.errors import UrlFetchError, UrlNotAllowedError

MAX_REDIRECTS = 3
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def resolve(host: str, port: int, deadline: float | None = None) -> list[IpAddress]:
    try:
        infos = _getaddrinfo(host, port, deadline)
    except socket.gaierror as exc:
        raise UnresolvableHostError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    except UnicodeError as exc:  # a label over 63 characters, or one IDNA cannot encode
        raise UrlNotAllowedError(f"the URL's host is not a valid name: {exc}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _getaddrinfo(host: str, port: int, deadline: float | None) -> list[Any]:
    """getaddrinfo cannot be interrupted: past the deadline the lookup is left to finish in its own thread
    (the resolver's own timeouts end it) and the fetch fails now."""
    if deadline is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)

    worker = threading.Thread(target=lookup, name="imsrc-url-resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise UrlFetchError(f"resolving {host!r} took too long")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    result: list[Any] = outcome[0]
    return result


def check_url(url: str, *, allow_private: bool, deadline: float | None = None) -> tuple[str, int, IpAddress]:
    """Validate one URL; returns (host, port, address to connect to)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # "Invalid IPv6 URL" and the like
        raise UrlNotAllowedError(f"the URL is not valid: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlNotAllowedError(f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}")
    if not hostname:
        raise UrlNotAllowedError("the URL has no host")
    if parts.username or parts.password:
        raise UrlNotAllowedError("URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UrlNotAllowedError("the URL has an invalid port") from exc
    # One answer for "no such name" and "a private address", naming no address: otherwise URL search tells
    # anyone which internal names exist and where they point.
    not_public = UrlNotAllowedError(
        f"refusing to fetch {hostname}: it does not resolve to a public address (loopback, private, link-local "
        "and reserved addresses are refused unless IMSRC_URL_FETCH_ALLOW_PRIVATE=true)"
    )
    try:
        addresses = resolve(hostname, port, deadline)
    except UnresolvableHostError:
        if allow_private:
            raise
        raise not_public from None
    if not allow_private and not all(is_public(a) for a in addresses):
        raise not_public
    return hostname, port, addresses[0]


class UnresolvableHostError(UrlFetchError):
    """The name does not resolve (told apart from private addresses only when those may be fetched)."""


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every operation is cut at one deadline for the whole fetch."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _left(self, timeout: float | None) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the fetch's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, self._left(timeout)), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the fetch's deadline passed")
        left = left if timeout is None else min(timeout, left)
        return _DeadlineStream(self._inner.connect_tcp(host, port, left, local_address, socket_options), self._deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def deadline_transport(deadline: float) -> httpx.HTTPTransport:
    """httpx's transport over a connection pool whose sockets all stop at `deadline`. httpx takes no network
    backend, so its pool is swapped for one built the same way with ours (no proxies: the request goes to
    the address that was checked)."""
    transport = httpx.HTTPTransport(trust_env=False)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=1,
        network_backend=_DeadlineBackend(deadline),
    )
    return transport


def fetch_image_bytes(
    url: str, *, timeout_s: float, max_bytes: int, allow_private: bool, transport: httpx.BaseTransport | None = None
) -> bytes:
    deadline = time.monotonic() + timeout_s
    current = url
    with httpx.Client(
        timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport or deadline_transport(deadline)
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host, port, address = check_url(current, allow_private=allow_private, deadline=deadline)
            parts = urlsplit(current)
            pinned_host = f"[{address}]" if address.version == 6 else str(address)
            pinned = parts._replace(netloc=f"{pinned_host}:{port}").geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "User-Agent": "imsrc-url-search"}
            try:
                with client.stream(
                    "GET", pinned, headers=headers, extensions={"sni_hostname": host} if parts.scheme == "https" else {}
                ) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise UrlFetchError(f"{current} redirected without a Location")
                        current = urljoin(current, location)
                        continue
                    if resp.status_code != 200:
                        raise UrlFetchError(f"fetching {current} failed: HTTP {resp.status_code}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise UrlFetchError(f"the image at {current} is larger than {max_bytes} bytes")
                    body = bytearray()
                    for chunk in resp.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise UrlFetchError(f"the image at {current} is larger than {max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise UrlFetchError(f"fetching {current} took longer than {timeout_s:g} s")
                    return bytes(body)
            except httpx.TimeoutException as exc:
                raise UrlFetchError(f"fetching {current} took longer than {timeout_s:g} s") from exc
            except httpx.HTTPError as exc:  # its text can name the pinned address and the OS's error: not shown
                raise UrlFetchError(f"fetching {current} failed: {_describe(exc)}") from exc
    raise UrlFetchError(f"too many redirects (more than {MAX_REDIRECTS}) from {url}")


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.ProtocolError):
        return "the answer was not valid HTTP"
    if isinstance(exc, httpx.DecodingError):
        return "the answer could not be decoded"
    return "the request failed"


class UrlFetcher:
    """Fetches query images with the settings' limits, at most `concurrency` at once; one per process (the
    search runtime holds it). A fetch beyond the cap is refused at once with BusyError (503 + Retry-After)
    instead of queueing: each waiting fetch would hold a worker thread, which is what starved other routes."""

    def __init__(self, *, timeout_s: float, max_bytes: int, allow_private: bool, concurrency: int) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self._slots = threading.BoundedSemaphore(concurrency)

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlFetcher:
        return cls(
            timeout_s=settings.url_fetch_timeout_s,
            max_bytes=settings.max_upload_bytes,
            allow_private=settings.url_fetch_allow_private,
            concurrency=settings.url_fetch_concurrency,
        )

    def fetch(self, url: str) -> bytes:
        if not self._slots.acquire(blocking=False):
            raise BusyError(
                "too many image URLs are being fetched right now (IMSRC_URL_FETCH_CONCURRENCY); retry shortly",
                retry_after=math.ceil(self.timeout_s),
            )
        try:
            return fetch_image_bytes(
                url, timeout_s=self.timeout_s, max_bytes=self.max_bytes, allow_private=self.allow_private
            )
        finally:
            self._slots.release()
