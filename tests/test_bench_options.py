"""Benchmark scripts refuse a bad option with argparse's one line and exit status 2, before any work: never a
traceback (a malformed --server-env or --checkout raised ValueError from dict(), a checkout without imsrc failed
after starting PostgreSQL; a negative --exact-queries silently timed exact on all queries but the last few and
recorded the negative count)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench/load/run.py", "--server-env", "IMSRC_SEARCH_CONCURRENCY"], "expected NAME=VALUE"),
        (["bench/load/run.py", "--server-env", "=4"], "expected NAME=VALUE"),
        (["bench/search/service_bench.py", "--synthetic", "100", "--exact-queries", "-1"], "--exact-queries"),
        (["bench/search/service_bench.py", "--synthetic", "100", "--timing-nice", "40"], "--timing-nice"),
        (["bench/load/startup.py", "--checkout", "before"], "expected NAME=PATH"),
        (["bench/load/startup.py", "--checkout", "before=/nonexistent"], "not an imsrc checkout"),
    ],
)
def test_bad_benchmark_options_are_refused_in_one_line(argv: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "backend"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
