"""A smoke run of bench/search/build_bench.py (not a benchmark: a few hundred vectors): every figure is produced,
and every category got its index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_build_bench_produces_every_figure(repo_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{repo_root / 'backend'}{os.pathsep}{repo_root}"}
    out = tmp_path / "build.json"
    done = subprocess.run(
        [
            sys.executable,
            str(repo_root / "bench/search/build_bench.py"),
            *("--rows", "300", "--categories", "3", "--dim", "16", "--exact-max-rows", "50"),
            *("--breakdown", "1", "--shared-buffers", "", "--out", str(out)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["per_category_indexes"] == 3 and result["structure"].startswith("category_vectors")
    assert set(result["builds_s"]) == {
        "global (service)",
        "global (m 32, ef_construction 80)",
        "per-category (sync)",
    }
    for label, seconds in result["builds_s"].items():
        assert seconds > 0 and result["builds_s_per_million_rows"][label] > seconds
    assert result["per_category_vs_global"] > 0
    assert result["breakdown"]["categories"] == 1 and result["breakdown"]["one_index_s"] > 0
    assert result["server"]["maintenance_work_mem"] and "--rows 300" in result["command"]
