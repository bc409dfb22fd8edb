"""The BENCHMARKS.md table of section "Citus: one node vs coordinator + 2 workers" from a results file of run.py.

    python bench/citus/report.py [bench/citus/results.json] [--before bench/citus/history/results-d0408f1.json]

Prints the table and the target sentence; paste them over the section's table (the prose around it says which
command and load average produced them: take those from the same file).
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


def table(d: dict[str, Any], old: dict[str, Any]) -> str:
    one, cit, same = d["one node"], d["citus 1+2"], d["same_ids_as_one_node"]
    n = d["queries"]
    lines = [
        "| | one node p50 / p95 ms | Citus 1+2 p50 / p95 ms | stage 2 (+ hydration) p50 ms, one node / Citus"
        " | recall@10 one node / Citus | same ids as one node | before: Citus vs one node p50 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in MODES:
        a, b = one[key], cit[key]
        lines.append(
            f"| {label} | {_r(a['p50_ms'])} / {_r(a['p95_ms'])} | {_r(b['p50_ms'])} / {_r(b['p95_ms'])} |"
            f" {_r(a['stage2_p50_ms'])} / {_r(b['stage2_p50_ms'])} | {a['recall_at_10']:.3f} / {b['recall_at_10']:.3f}"
            f" | {round(same[key] * n)} of {n} | {_r(old['citus 1+2'][key]['p50_ms'])} vs"
            f" {_r(old['one node'][key]['p50_ms'])} |"
        )
    key = "searches_per_s_two_stage_1_category"
    lines.append(
        f"| searches/s, {d['clients']} clients, two-stage 1 category | {one[key]} | {cit[key]} | | | |"
        f" {old['citus 1+2'][key]} vs {old['one node'][key]} |"
    )
    for label, build in (
        ("build: COPY load", "load_s"),
        (f"build: per-category HNSW ({d['categories']} indexes)", "hnsw_per_category_build_s"),
        ("prototypes (sync)", "prototypes_s"),
    ):
        lines.append(f"| {label} | {_r(one['build'][build])} s | {_r(cit['build'][build])} s | | | | |")
    ratio1 = cit[MODES[0][0]]["p50_ms"] / one[MODES[0][0]]["p50_ms"]
    ratio3 = cit[MODES[1][0]]["p50_ms"] / one[MODES[1][0]]["p50_ms"]
    faster = cit[MODES[1][0]]["p50_ms"] < one[MODES[1][0]]["p50_ms"]
    met = "met" if max(ratio1, ratio3) <= 2 else "missed"
    lines += [
        "",
        f"Load average {[round(x, 1) for x in d['load_average_before']]} before,"
        f" {[round(x, 1) for x in d['load_average_after']]} after. Two-stage p50 on Citus is {ratio1:.2f}x one node's"
        f" with one category and {ratio3:.2f}x with three (target <= 2x: {met});"
        f" three-category searches on Citus are {'faster' if faster else 'not faster'} than one node's sequential"
        " branches.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(ROOT / "bench" / "citus" / "results.json"))
    parser.add_argument("--before", default=str(ROOT / "bench" / "citus" / "history" / "results-d0408f1.json"))
    args = parser.parse_args()
    print(table(json.loads(Path(args.results).read_text()), json.loads(Path(args.before).read_text())))


if __name__ == "__main__":
    main()
