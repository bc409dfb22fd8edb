"""The BENCHMARKS.md table of section "Citus: one node vs coordinator + 2 workers" from a results file of run.py.

    python bench/citus/report.py [bench/citus/results.json] [--before bench/citus/history/results-c059f75.json]

Prints the table, the profile and the target sentence; paste them over the section's table (the prose around it says
which command produced them). --before adds a column with an earlier run's p50s (say in the prose what differed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODES = (
    ("two_stage, 1 category", "two-stage, 1 category"),
    ("two_stage, 3 categories", "two-stage, 3 categories"),
    ("ann", "ann (every shard)"),
)


def _r(x: float) -> str:
    return f"{x:.1f}"


def table(d: dict[str, Any], old: dict[str, Any] | None) -> str:
    one, cit, same = d["one node"], d["citus 1+2"], d["same_ids_as_one_node"]
    n = d["queries"]
    before = " before: Citus vs one node p50 |" if old else ""
    lines = [
        "| | one node p50 / p95 ms | Citus 1+2 p50 / p95 ms | stage 2 (+ hydration) p50 ms, one node / Citus"
        f" | recall@10 one node / Citus | same ids as one node | k rows, one node / Citus |{before}",
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if old else ""),
    ]
    for key, label in MODES:
        a, b = one[key], cit[key]
        was = f" {_r(old['citus 1+2'][key]['p50_ms'])} vs {_r(old['one node'][key]['p50_ms'])} |" if old else ""
        lines.append(
            f"| {label} | {_r(a['p50_ms'])} / {_r(a['p95_ms'])} | {_r(b['p50_ms'])} / {_r(b['p95_ms'])} |"
            f" {_r(a['stage2_p50_ms'])} / {_r(b['stage2_p50_ms'])} | {a['recall_at_10']:.3f} / {b['recall_at_10']:.3f}"
            f" | {round(same[key] * n)} of {n} | {n - a['short_answers']} / {n - b['short_answers']} of {n} |{was}"
        )
    key = "searches_per_s_two_stage_1_category"
    was = f" {old['citus 1+2'][key]} vs {old['one node'][key]} |" if old else ""
    lines.append(f"| searches/s, {d['clients']} clients, two-stage 1 category | {one[key]} | {cit[key]} | | | | |{was}")
    empty = " |" if old else ""
    for label, build in (
        ("build: COPY load", "load_s"),
        ("build: the model's HNSW index (ann)", "hnsw_global_build_s"),
        (f"build: per-category HNSW ({d['categories']} indexes)", "hnsw_per_category_build_s"),
        ("prototypes (sync)", "prototypes_s"),
    ):
        lines.append(f"| {label} | {_r(one['build'][build])} s | {_r(cit['build'][build])} s | | | | |{empty}")
    if "database_mb" in one:
        lines.append(
            f"| database on disk (Citus: all nodes) | {one['database_mb']:.0f} MB | {cit['database_mb']:.0f} MB |"
            f" | | | |{empty}"
        )
    ratio1 = cit[MODES[0][0]]["p50_ms"] / one[MODES[0][0]]["p50_ms"]
    ratio3 = cit[MODES[1][0]]["p50_ms"] / one[MODES[1][0]]["p50_ms"]
    faster = cit[MODES[1][0]]["p50_ms"] < one[MODES[1][0]]["p50_ms"]
    met = "met" if max(ratio1, ratio3) <= 2 else "missed"
    shorts = sum(d[s][m]["short_answers"] for s in ("one node", "citus 1+2") for m, _ in MODES)
    lines += ["", "Where a Citus stage 2 spends its time (`profile_ms`, median ms per call, variants interleaved):", ""]
    lines += [f"- {k}: {v:.2f} ms" for k, v in cit.get("profile_ms", {}).items()]
    lines += [
        "",
        f"Load average {[round(x, 1) for x in d['load_average_before']]} before,"
        f" {[round(x, 1) for x in d['load_average_after']]} after; {d.get('wall_s', '?')} s in all."
        f" Two-stage p50 on Citus is {ratio1:.2f}x one node's with one category and {ratio3:.2f}x with three"
        f" (target <= 2x: {met}); three-category searches on Citus are {'faster' if faster else 'not faster'}"
        f" than one node's sequential branches ({cit[MODES[1][0]]['p50_ms']:.1f} vs {one[MODES[1][0]]['p50_ms']:.1f} ms"
        f" p50); {'every query got k rows' if shorts == 0 else f'{shorts} answers were short of k rows'}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(ROOT / "bench" / "citus" / "results.json"))
    parser.add_argument("--before", help="an earlier results file: its p50s in a last column")
    args = parser.parse_args()
    old = json.loads(Path(args.before).read_text()) if args.before else None
    print(table(json.loads(Path(args.results).read_text()), old))


if __name__ == "__main__":
    main()
