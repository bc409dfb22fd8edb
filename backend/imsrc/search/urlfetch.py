"""Fetch a query image by URL: http/https only, public addresses only (unless allowed), few redirects,
a time limit for the whole fetch and a size limit on the body.

The host is resolved once, every address is checked, and the connection goes to the checked address (Host
header and TLS SNI keep the name), so a DNS answer that changes between check and connect cannot redirect
the request to an internal address.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import httpx

from imsrc.search.errors import UrlFetchError, UrlNotAllowedError

MAX_REDIRECTS = 3
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_reserved or address.is_unspecified or not address.is_global)


def resolve(host: str, port: int) -> list[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlFetchError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_url(url: str, *, allow_private: bool) -> tuple[str, int, IpAddress]:
    """Validate one URL; returns (host, port, address to connect to)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlNotAllowedError(f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise UrlNotAllowedError("the URL has no host")
    if parts.username or parts.password:
        raise UrlNotAllowedError("URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UrlNotAllowedError("the URL has an invalid port") from exc
    addresses = resolve(parts.hostname, port)
    if not allow_private:
        bad = [str(a) for a in addresses if not is_public(a)]
        if bad:
            raise UrlNotAllowedError(
                f"refusing to fetch {parts.hostname}: it resolves to a loopback, private, link-local or reserved "
                f"address ({bad[0]}); set IMSRC_URL_FETCH_ALLOW_PRIVATE=true to allow this")
    return parts.hostname, port, addresses[0]


def fetch_image_bytes(url: str, *, timeout_s: float, max_bytes: int, allow_private: bool,
                      transport: httpx.BaseTransport | None = None) -> bytes:
    deadline = time.monotonic() + timeout_s
    current = url
    with httpx.Client(timeout=timeout_s, follow_redirects=False, transport=transport) as client:
        for _ in range(MAX_REDIRECTS + 1):
            host, port, address = check_url(current, allow_private=allow_private)
            parts = urlsplit(current)
            pinned_host = f"[{address}]" if address.version == 6 else str(address)
            pinned = parts._replace(netloc=f"{pinned_host}:{port}").geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*",
                       "User-Agent": "imsrc-url-search"}
            try:
                with client.stream("GET", pinned, headers=headers,
                                   extensions={"sni_hostname": host} if parts.scheme == "https" else {}) as resp:
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
            except httpx.HTTPError as exc:
                raise UrlFetchError(f"fetching {current} failed: {exc}") from exc
    raise UrlFetchError(f"too many redirects (more than {MAX_REDIRECTS}) from {url}")
