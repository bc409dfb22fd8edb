"""Support for the browser tests: a real `imsrc serve` on loopback and headless Chromium through Playwright."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.servers import live_server, serve_env
from tests.helpers import ROOT


def find_chromium() -> str | None:
    """IMSRC_CHROMIUM, else the system Chromium (Debian `chromium`, Ubuntu `chromium-browser`)."""
    chosen = os.environ.get("IMSRC_CHROMIUM")
    if chosen:
        return chosen if Path(chosen).is_file() or shutil.which(chosen) else None
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium() or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def screenshot_dir() -> Path:
    """Where screenshots go: IMSRC_SCREENSHOT_DIR (docs/screenshots refreshes the README's), else a temp dir,
    so an ordinary test run never rewrites tracked files."""
    chosen = os.environ.get("IMSRC_SCREENSHOT_DIR")
    path = Path(chosen) if chosen else Path(tempfile.gettempdir()) / "imsrc-screenshots"
    if not path.is_absolute():
        path = ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_browser() -> Any:
    """The Playwright sync API, or a skip that says what is missing and how to get it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright for Python (pip install playwright); not installed")
    if find_chromium() is None:
        pytest.skip(
            "browser tests need Chromium (Debian: apt-get install chromium; or set IMSRC_CHROMIUM to a "
            "Chromium/Chrome binary); none found"
        )
    return sync_playwright


@contextmanager
def running_server(
    database_url: str,
    data_dir: Path,
    *,
    model: str = "open_clip-tiny-test",
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`imsrc serve` on a free loopback port (tests.fixtures.servers.live_server); yields its base URL. Its log
    is data_dir/server.log, kept at IMSRC_SERVER_LOG too when that is set (for debugging a failure)."""
    env = serve_env(data_dir, database_url=database_url, model=model, **(extra_env or {}))
    try:
        with live_server(env, data_dir / "server.log", start_timeout=timeout) as server:
            yield server.base
    finally:
        keep = os.environ.get("IMSRC_SERVER_LOG")
        if keep and (data_dir / "server.log").exists():
            shutil.copyfile(data_dir / "server.log", keep)
