"""Support for the browser tests: a real `imsrc serve` on loopback and headless Chromium through Playwright."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

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
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


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
        pytest.skip("browser tests need Chromium (Debian: apt-get install chromium; or set IMSRC_CHROMIUM to a "
                    "Chromium/Chrome binary); none found")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(database_url: str, data_dir: Path, *, model: str = "open_clip-tiny-test",
                   timeout: float = 120, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`imsrc serve` in a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_") or k == "IMSRC_INFERENCE"}
    env.update({"IMSRC_DATABASE_URL": database_url, "IMSRC_MODEL": model, "IMSRC_DATA_DIR": str(data_dir),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "backend"), env.get("PYTHONPATH")]))})
    env.update(extra_env or {})
    log = (data_dir / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "imsrc.cli.main", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{(data_dir / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{(data_dir / 'server.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        keep = os.environ.get("IMSRC_SERVER_LOG")  # where to keep the server's log, for debugging a failure
        if keep:
            shutil.copyfile(data_dir / "server.log", keep)
