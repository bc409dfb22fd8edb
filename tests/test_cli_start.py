"""The CLI starts fast: torch, open_clip, torchvision and faiss load only in the commands that embed or search.

Importing torch alone takes seconds; the timings are in BENCHMARKS.md ("CLI start", bench/cli/run.py). Here we
check the cause, which does not depend on the machine's load: which modules each command imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("torch", "open_clip", "torchvision", "faiss")

# Runs the real `imsrc` entry point and reports, at exit, which heavy modules the command had imported.
PROBE = f"""
import atexit, sys
atexit.register(lambda: sys.stderr.write(
    "\\nHEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n"))
sys.argv = ["imsrc", *sys.argv[1:]]
from imsrc.cli.main import main
main()
"""


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=full_env,
                            cwd=ROOT, timeout=120)
    marker = [line for line in result.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, result.stderr
    heavy = [m for m in marker[-1].removeprefix("HEAVY=").split(",") if m]
    return result, heavy


def test_importing_the_cli_does_not_import_torch() -> None:
    code = f"import imsrc.cli.main, sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_works_without_heavy_imports() -> None:
    result, heavy = _run("--help")
    assert result.returncode == 0 and "search" in result.stdout and "serve" in result.stdout
    assert heavy == []
    result, heavy = _run("search", "image", "--help")
    assert result.returncode == 0 and "--categories" in result.stdout
    assert heavy == []


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (("sql", "SELECT 40 + 2 AS answer", "--json"), lambda out: json.loads(out) == [{"answer": 42}]),
        (("stats", "--json"), lambda out: "images" in json.loads(out)["counts"]),
        (("categories", "list", "--json"), lambda out: isinstance(json.loads(out), list)),
        (("jobs", "--json"), lambda out: isinstance(json.loads(out), list)),
    ],
    ids=["sql", "stats", "categories-list", "jobs"],
)
def test_catalog_commands_work_without_heavy_imports(database_url: str, args: tuple[str, ...], check) -> None:  # type: ignore[no-untyped-def]
    result, heavy = _run(*args, env={"IMSRC_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert check(result.stdout), result.stdout
    assert heavy == []


def test_db_status_without_heavy_imports(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("cli-start")
    result, heavy = _run("db", "status", "--json", env={"IMSRC_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["running"] is False
    assert heavy == []

