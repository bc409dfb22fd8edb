"""Plot and BENCHMARKS.md section for bench/search/run.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SECTION = "## Search"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["sizes"], key=lambda r: r["rows"])
    if not sizes:
        return
    labels = list(dict.fromkeys(label for s in sizes for label in s["methods"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, filtered in zip(axes, (False, True), strict=True):
        for label in labels:
            if label.startswith("filter:") != filtered:
                continue
            xs = [s["rows"] for s in sizes if label in s["methods"]]
            ys = [s["methods"][label]["p50_ms"] for s in sizes if label in s["methods"]]
            recall = [s["methods"][label]["recall_at_10"] for s in sizes if label in s["methods"]][-1]
            ax.plot(xs, ys, marker="o", label=f"{label.removeprefix('filter: ')} (recall {recall:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors (512-d, 100 categories)")
        ax.set_title("explicit filter: 3 random categories" if filtered else "query (stage 1 + stage 2)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("stage-2 latency p50 (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(size: dict[str, Any]) -> list[str]:
    exact = size["methods"]["exact scan (pgvector)"]["p50_ms"]
    fexact = size["methods"]["filter: exact scan"]["p50_ms"]
    lines = [
        "| method | p50 ms | p95 ms | recall@10 | rows returned (mean / min) | speed-up vs exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in size["methods"].items():
        base = fexact if label.startswith("filter:") else exact
        lines.append(
            f"| {label} | {m['p50_ms']:.2f} | {m['p95_ms']:.2f} | {m['recall_at_10']:.3f} | "
            f"{m['mean_rows']:.1f} / {m['min_rows']} | {base / max(m['p50_ms'], 1e-6):.0f}x |"
        )
    return lines


def write_markdown(results: dict[str, Any], path: Path, structured: dict[str, Any] | None = None) -> None:
    p = results["params"]
    out = [
        SECTION,
        "",
        f"`bench/search/run.py` on {results['machine']['cpus']} CPUs ({results['machine']['platform']}), "
        f"PostgreSQL shared_buffers {results.get('server', {}).get('shared_buffers', '?')}: "
        f"synthetic Gaussian mixture, {p['categories']} categories, {p['dim']}-d unit vectors (noise "
        f"{p['spread']} of the centre's norm), loaded with binary COPY; queries drawn from the same "
        f"mixture; k = 10. Stage 1 as the service does it: categories until {p.get('score_mass', 0.9)} of "
        f"the score mass is covered, at most {p.get('max_categories', 3)} (rows marked 'always 3 categories' "
        f"take the top 3 regardless). pgvector: per-category partial HNSW (m 32, ef_construction 80), "
        f"hnsw.ef_search max({p['ef_search']}, 2 sqrt(rows)) in categories the query is near and 1000 in "
        "filtered categories it is not like; categories under "
        f"{p['exact_max_rows']} rows are scanned exactly. FAISS: flat sub-indexes for small categories, 4-bit "
        "PQ fast-scan with an exact re-rank for large ones. Table and indexes prewarmed into shared_buffers. "
        "Latency is stage 2 only, measured from Python (includes the round trip), every method on the same "
        "queries, interleaved, in one run. Ground truth: NumPy brute force over the stored vectors. "
        "`filter:` rows use an explicit filter of 3 random categories, unrelated to the query. "
        "Plot: `bench/search/latency.png`; raw figures: `bench/search/results.json`.",
        "",
    ]
    for size in sorted(results["sizes"], key=lambda r: r["rows"]):
        b, s, st = size["build_s"], size["sizes"], size["stage1"]
        summary = (
            f"Stage 1 ({st.get('mean_categories', st['categories'])} of {p['categories']} categories on average): "
            f"p50 {st['p50_ms']:.3f} ms; category "
            f"recall (share of the true top-10 inside the chosen categories) {st['category_recall']:.3f}."
        )
        builds = (
            f"Builds: COPY {b['copy_s']:.1f} s; pgvector HNSW over all {b['hnsw_global_build_s']:.1f} s "
            f"({s['hnsw_global_bytes'] / 2**20:.0f} MiB); per-category HNSW {b['hnsw_per_category_build_s']:.1f} s "
            f"({s['hnsw_per_category_bytes'] / 2**20:.0f} MiB); FAISS per-category {b['faiss_build_s']:.1f} s "
            f"(~{s['faiss_bytes'] / 2**20:.0f} MiB in memory); prototypes {b['prototypes_s']:.1f} s; "
            f"embeddings table {s['embeddings_table_bytes'] / 2**20:.0f} MiB."
        )
        if "partition_hnsw_build_s" in b:
            builds += (
                f" LIST-partitioned copy: {b['partition_copy_s']:.1f} s to copy, per-partition HNSW "
                f"{b['partition_hnsw_build_s']:.1f} s ({s['partition_hnsw_bytes'] / 2**20:.0f} MiB)."
            )
        out += [f"### {size['rows']:,} vectors ({size['queries']} queries)", "", *_table(size), "", summary, builds, ""]
        cal = size.get("calibration")
        if cal:
            out += [
                f"One category of {cal['rows_per_category']:,} rows, queried from every category (so "
                f"mostly from far away, ef_search 1000): exact branch p50 {cal['exact_p50_ms']:.2f} ms, "
                "per-category HNSW "
                f"branch p50 {cal['hnsw_p50_ms']:.2f} ms (recall@10 {cal['hnsw_recall_at_10']:.3f}).",
                "",
            ]
    if structured:
        out += [
            "### Structured mixture (noise in a 16-dimensional subspace per category)",
            "",
            "Same benchmark, but each category's spread lies mostly in its own random 16-d subspace (plus "
            "10 % isotropic noise), closer to real image embeddings, whose neighbourhoods have low intrinsic "
            "dimension; the isotropic mixture above is the worst case for any graph index.",
            "",
        ]
        for size in sorted(structured["sizes"], key=lambda r: r["rows"]):
            out += [f"#### {size['rows']:,} vectors ({size['queries']} queries)", "", *_table(size), ""]
            cal = size.get("calibration")
            if cal:
                out += [
                    f"One category of {cal['rows_per_category']:,} rows: exact p50 {cal['exact_p50_ms']:.2f} ms,"
                    f" per-category HNSW p50 {cal['hnsw_p50_ms']:.2f} ms (recall@10 "
                    f"{cal['hnsw_recall_at_10']:.3f}).",
                    "",
                ]
    notes = results.get("notes")
    if notes:
        out += ["### Targets and notes", "", *notes, ""]
    section = "\n".join(out).rstrip() + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
