"""A smoke run of bench/search/service_bench.py (not a benchmark: a few hundred vectors), checking that every
row the published tables are made of was produced, through the service and through HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# The rows of the published tables (bench/search/service_bench.py METHODS).
LABELS = {"exact", "ann pgvector", "two_stage pgvector", "ann FAISS", "two_stage FAISS"}


def test_service_bench_produces_every_row(repo_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{repo_root / 'backend'}{os.pathsep}{repo_root}"}
    done = subprocess.run(
        [
            sys.executable,
            str(repo_root / "bench/search/service_bench.py"),
            "--synthetic",
            "300",
            "--categories",
            "5",
            "--dim",
            "32",
            "--queries",
            "6",
            "--calibration",
            "3",
            "--http-queries",
            "3",
            "--shared-buffers",
            "",
            "--results-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "synthetic-300.json").read_text())
    assert set(result["service"]) >= LABELS and len(result["service"]) == len(LABELS) + 2
    for row in result["service"].values():
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and 0 <= row["recall_at_10"] <= 1
    assert result["service"]["exact"]["recall_at_10"] == 1.0
    # 300 vectors: under IMSRC_SEARCH_TWO_STAGE_MIN_ROWS, so pgvector two-stage is answered as ann, and says so
    assert result["service"]["two_stage pgvector"]["response_mode"] == ["ann"]
    assert result["service"]["two_stage pgvector, small-catalog rule off"]["response_mode"] == ["two_stage"]
    # The SQL functions beside the service: the same ids in the same order for every query (issue 19)
    assert set(result["sql"]) == {"exact SQL", "ann SQL", "two_stage SQL", "two_stage SQL, small-catalog rule off"}
    for row in result["sql"].values():
        assert row["same_as_service"] == 1.0 and 0 < row["p50_ms"] <= row["p95_ms"]
    # Stage-1 rules side by side; the fixed fan-outs search exactly that many categories; sync calibrated
    rules = result["stage1_rules"]
    assert list(rules) == [
        "fixed temperature 0.05, cut at the cap",
        "calibrated, cut at the cap",
        "calibrated, ann over the cap (default)",
        "calibrated, over the cap up to 6 categories, then ann",
        "calibrated, over the cap every category the rule wants",
        "fan-out 1",
        "fan-out 2",
        "fan-out 3",
    ]
    assert [rules[f"fan-out {n}"]["mean_categories"] for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert all(0 <= r["ann_share"] <= 1 for r in rules.values()) and rules["fan-out 1"]["ann_share"] == 0
    # Searching every category the rule wants instead of `ann`: no query is answered by ann, and over-cap ones
    # search more categories than the cap.
    every = rules["calibrated, over the cap every category the rule wants"]
    assert every["ann_share"] == 0 and every["fallback_categories"] == 1000
    assert rules["calibrated, ann over the cap (default)"]["fallback_categories"] == 0
    assert result["ann_walk"]["ef"] > 0 and result["ann_walk"]["samples"] > 0  # the model's graph calibrated
    assert result["calibration"]["temperature"] > 0 and result["calibration"]["samples"] > 0
    assert result["calibration"]["fallback"] is True and 0 <= result["calibration"]["over_cap"] <= 1
    assert set(result["http"]) == LABELS and all(r["p50_ms"] > 0 for r in result["http"].values())
    # A pass per backend, each over HTTP against a server of that backend once its warm-up was done.
    assert result["method_order"].startswith("a pass per backend")
    assert set(result["http_warm_s"]) == {"pgvector", "faiss", "exact"}
    assert result["http_health_s"] > 0 and all(s > 0 for s in result["http_warm_s"].values())
    for cold in result["cold_restart"].values():  # PostgreSQL restarted, warm-up off and on
        assert cold["health_s"] > 0 and cold["first_query_ms"] > 0 and cold["later_p50_ms"] > 0
    assert set(result["cold_restart"]) == {"warm_up_off", "warm_up_on", "warm_up_on_after_ready"}
    assert result["cold_restart"]["warm_up_on_after_ready"]["warm_up_wait_s"] >= 0
    assert result["server"]["jit"] and result["settings"]["search_ef_search"] > 0
    assert "--results-dir" not in result["command"] and "--synthetic 300" in result["command"]
