"""A wheel built from this checkout works without it: installed (not editable) into a fresh virtualenv, run from
another folder, it migrates an empty database, indexes a folder and serves the web page with its assets.

The wheel's own dependencies are not downloaded again: the fresh venv sees the test venv's site-packages through
a plain path in a .pth file. A path line adds that folder only; the .pth files inside it (among them the editable
install's, which would put this checkout's backend/ on sys.path) are not processed, and PYTHONPATH is cleared,
so `import imsrc` can only find the wheel's copy (asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imsrc.db.engine import head_revision
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.fixtures.servers import live_server
from tests.helpers import ROOT, make_image


def _exe(venv: Path, name: str) -> str:
    return str(venv / "Scripts" / f"{name}.exe") if os.name == "nt" else str(venv / "bin" / name)


@dataclass
class Installed:
    work: Path  # a folder outside the checkout, the commands' working directory
    venv: Path
    database_url: str

    def env(self) -> dict[str, str]:
        keep = {"IMSRC_INFERENCE"}  # tests run torch (conftest): no ONNX export in every subprocess
        env = {k: v for k, v in os.environ.items() if (not k.startswith("IMSRC_") or k in keep) and k != "PYTHONPATH"}
        env.update(
            {
                "IMSRC_DATABASE_URL": self.database_url,
                "IMSRC_DATA_DIR": str(self.work / "data"),
                "IMSRC_MODEL": "open_clip-tiny-test",
                "IMSRC_WORKERS": "1",
            }
        )
        return env

    def imsrc(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_exe(self.venv, "imsrc"), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.work,
            timeout=timeout,
        )


def _sources(dest: Path) -> None:
    """The checkout's files as git sees them (tracked or not ignored), so the build gets no .venv or data/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    if listed.returncode != 0:  # not a git checkout: copy everything but the usual local state
        shutil.copytree(
            ROOT,
            dest,
            ignore=shutil.ignore_patterns(
                ".venv", "data", ".git", "build", "dist", "*.egg-info", "__pycache__", "node_modules"
            ),
        )
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(create_database) -> Iterator[Installed]:  # type: ignore[no-untyped-def]
    work = Path(tempfile.mkdtemp(prefix="imsrc-wheel-"))
    try:
        src = work / "src"
        _sources(src)
        # sdist first, then the wheel from it: checks MANIFEST.in carries what setup.py puts into the wheel.
        sdist = (
            _run(
                [sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"], src
            )
            .strip()
            .splitlines()[-1]
        )
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(work / "wheels"),
                str(src / "dist" / sdist),
            ],
            work,
        )
        wheels = list((work / "wheels").glob("imsrc-*.whl"))
        assert len(wheels) == 1, wheels
        venv = work / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                _exe(venv, "python"),
                "install",
                "-q",
                "--no-deps",
                "--no-index",
                str(wheels[0]),
            ],
            work,
        )
        purelib = _run(
            [_exe(venv, "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work
        ).strip()
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (Path(purelib) / "_imsrc_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
        shutil.rmtree(src)  # nothing of the checkout is left for the installed package to lean on
        (work / "data").mkdir()
        yield Installed(work=work, venv=venv, database_url=create_database("imsrc_wheel"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_installed_package_is_the_wheel(installed: Installed) -> None:
    code = (
        "import json, imsrc, imsrc.resources as r; print(json.dumps([imsrc.__file__, str(r.frontend_dir()), "
        "str(r.migrations_dir())]))"
    )
    done = subprocess.run(
        [_exe(installed.venv, "python"), "-c", code],
        capture_output=True,
        text=True,
        env=installed.env(),
        cwd=installed.work,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for path in json.loads(done.stdout):
        assert Path(path).is_relative_to(installed.venv), path


def test_wheel_migrates_an_empty_database_and_indexes_a_folder(installed: Installed) -> None:
    migrated = installed.imsrc("migrate", "--json")
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["revision"] == head_revision(installed.database_url)

    photos = installed.work / "photos"
    for n, category in enumerate(("red", "blue")):
        (photos / category).mkdir(parents=True)
        for i in range(2):
            (photos / category / f"{i}.png").write_bytes(make_image(900 + 10 * n + i))
    indexed = installed.imsrc("index", str(photos), "--category-from-folder", "--json", timeout=600)
    assert indexed.returncode == 0, indexed.stderr
    summary = json.loads(indexed.stdout)
    assert summary["status"] == "completed" and summary["run_counts"]["new"] == 4, summary
    stats = installed.imsrc("stats", "--json")
    assert json.loads(stats.stdout)["counts"]["images"] == 4


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[str]:
    with live_server(
        installed.env(),
        installed.work / "server.log",
        command=[_exe(installed.venv, "imsrc")],
        cwd=installed.work,
        start_timeout=180,
    ) as server:
        yield server.base


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()


def test_wheel_serves_the_page_and_its_assets(served: str) -> None:
    status, kind, page = _get(f"{served}/")
    assert status == 200 and kind.startswith("text/html")
    assert 'href="css/app.css"' in page and 'src="js/app.js"' in page
    status, kind, css = _get(f"{served}/css/app.css")
    assert status == 200 and kind.startswith("text/css") and len(css) > 1000
    status, kind, js = _get(f"{served}/js/app.js")
    assert status == 200 and "javascript" in kind and "import" in js
    status, _, body = _get(f"{served}/api/status")
    assert status == 200 and json.loads(body)["schema_revision"] == json.loads(body)["schema_head"]


@pytest.mark.browser
def test_wheel_page_loads_in_chromium(served: str) -> None:
    sync_playwright = require_browser()
    errors: list[Any] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(e))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{served}/#/browse/all")
            page.wait_for_selector(".grid .card-link", timeout=60_000)  # rendered by the page's JS from the API
            assert page.locator(".grid .card-link").count() >= 1
        finally:
            browser.close()
    assert errors == []
