"""BENCHMARKS.md's `## Search` section, from every bench/search/results/*.json that service_bench.py wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.bench_common import replace_section

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = RESULTS / "history"


def _table(rows: dict[str, dict[str, Any]], exact_key: str, with_quality: bool) -> list[str]:
    head = "| method | p50 ms | p95 ms | p99 ms | recall@10 vs exact |"
    rule = "|---|---:|---:|---:|---:|"
    if with_quality:
        head += " label p@10 | stage 2 p50 ms (timings_ms) |"
        rule += "---:|---:|"
    head += " response mode |"
    rule += "---|"
    out = [head, rule]
    for label, m in rows.items():
        line = f"| {label} | {m['p50_ms']:.2f} | {m['p95_ms']:.2f} | {m['p99_ms']:.2f} | "
        line += f"{m['recall_at_10']:.3f} |" if "recall_at_10" in m else "- |"
        if with_quality:
            line += f" {m['label_p_at_10']:.3f} | {m['stage2_p50_ms']:.2f} |"
        line += f" {', '.join(m.get('response_mode', []))} |"
        out.append(line)
    return out


def rules_lines(r: dict[str, Any]) -> list[str]:
    """The stage-1 rules table of one run (fixed temperature, calibrated, fan-outs), with the calibration."""
    lines: list[str] = []
    rules = r.get("stage1_rules")
    if rules:
        cal = r.get("calibration") or {}
        exact = r["service"]["exact"]
        lines += [
            "",
            "Stage-1 rules on the same queries (two_stage pgvector, small-catalog rule off; exact search's "
            f"label p@10 is {exact['label_p_at_10']:.3f}). The calibrated rule's temperature was fitted at "
            f"sync time on {cal.get('samples', '?')} members held out of their own prototypes "
            f"(search/calibration.py): {cal.get('temperature', float('nan')):.4f}, at which the rule picks the "
            f"member's own category for {cal.get('coverage', float('nan')):.3f} of them (target "
            f"{cal.get('target', '?')}; {cal.get('mean_categories', float('nan')):.2f} categories on average; "
            + (
                f"{cal.get('over_cap', 0.0):.3f} of them want more than the cap of {cal.get('cap', '?')} and are "
                "answered by `ann`; "
                if cal.get("fallback")
                else f"cut at the cap of {cal.get('cap', '?')}; "
            )
            + f"the prototype classifier's top-1 accuracy there {cal.get('top1', float('nan')):.3f}). A query "
            "answered by `ann` counts as searching every category.",
            "",
            "| rule | label p@10 | recall@10 vs exact | stage-1 category recall | categories searched "
            "(mean; histogram) | answered by ann | p50 ms |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for label, m in rules.items():
            lines.append(
                f"| {label} | {m['label_p_at_10']:.3f} | {m['recall_at_10']:.3f} | "
                f"{m['category_recall']:.3f} | {m['mean_categories']:.2f}; {m['categories_histogram']} | "
                f"{m.get('ann_share', 0.0):.3f} | {m['p50_ms']:.2f} |"
            )
    return lines


def stage1_section(r: dict[str, Any]) -> list[str]:
    """A run kept under results/stage1/ for its stage-1 rules and cold-start rows (quality figures do not move
    with load; its latencies were taken on a much busier machine than the tables above and are not compared)."""
    d = r["data"]
    m = r["machine"]
    lines = [
        f"#### {d['rows']:,} {'real Fashion-MNIST images' if d['kind'] == 'real' else d['kind'] + ' vectors'}",
        "",
        f"Measured by `{r['command']}` ({r['queries']} queries, k = {r['k']}), machine load average "
        f"{m['load_average_before'][0]} before and {m['load_average_after'][0]} after (2 CPUs): latencies "
        "here are several times the quiet-machine ones above and only compare within this run. Raw: "
        f"`bench/search/results/stage1/{d['kind']}-{d['rows']}.json`.",
    ]
    lines += rules_lines(r)
    s1 = r["stage1"]
    lines += [
        "",
        f"Default rule through the service: category recall {s1['category_recall']:.3f}, "
        f"{s1['mean_categories']} categories on average.",
    ]
    cold = r.get("cold_restart")
    if cold:
        what = {
            "warm_up_off": "warm-up off",
            "warm_up_on": "warm-up on",
            "warm_up_on_after_ready": "warm-up on, first query once `/health/ready` said `search_warm`",
        }
        workers = next(iter(cold.values())).get("workers", 2)
        lines += [
            "",
            f"Cold start at that load (PostgreSQL restarted, fresh `imsrc serve` with {workers} worker"
            f"{'s' if workers != 1 else ''}; first `similar` query, then the p50 of 20 more after 10 s): "
            + "; ".join(
                f"{what.get(key, key)}: first query {c['first_query_ms']:.0f} ms, then p50 "
                f"{c['later_p50_ms']:.0f} ms ({c['first_query_ms'] / c['later_p50_ms']:.0f}x)"
                + (f", warm-up finished {c['warm_up_wait_s']} s after /health" if "warm_up_wait_s" in c else "")
                for key, c in cold.items()
            )
            + ".",
        ]
    return lines


def section(r: dict[str, Any]) -> list[str]:
    d = r["data"]
    if d["kind"] == "real":
        title = f"### Real embeddings: {d['rows']:,} Fashion-MNIST images, EfficientNet-Lite0 (1280-d)"
        what = (
            f"{d['dataset']}; embedded once with {d['model']} (IMSRC_INFERENCE={d['inference']}) and cached "
            "under bench/search/data/; 10 categories = the 10 labels."
        )
    elif d["kind"] == "real-calibrated":
        title = f"### Real-calibrated: {d['rows']:,} vectors from {d['base_rows']:,} Fashion-MNIST embeddings (1280-d)"
        what = (
            f"{d['dataset']} (noise {d['noise']} of the label's per-dimension spread): the labels overlap as the "
            "real ones do; 10 categories = the 10 labels."
        )
    else:
        title = f"### Synthetic: {d['rows']:,} vectors, {d['categories']} categories, {d['dim']}-d"
        what = (
            f"Gaussian mixture (noise {d['spread']} of the centre's norm): categories are far apart, so stage 1 "
            "is always right here; the real-data table is where its mistakes show."
        )
    s1 = r["stage1"]
    t = r["ann_tuning"]
    m = r["machine"]
    lines = [
        title,
        "",
        f"Measured by `{r['command']}` ({r['queries']} queries, k = {r['k']}). {what}",
        "",
        f"Machine: {m['cpus']} CPUs, **shared with other jobs during the run** (load average "
        f"{m['load_average_before'][0]} before, {m['load_average_after'][0]} after). PostgreSQL: "
        + ", ".join(f"{k} {v}" for k, v in r["server"].items())
        + ". imsrc: "
        + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        + ".",
        "",
        "Service path (`SearchService.similar` in a fresh session per query, as the API runs it):",
        "",
    ]
    lines += _table(r["service"], "exact", True)
    lines += [
        "",
        "Stage 1 (two_stage pgvector with the small-catalog rule off): "
        f"{s1['mean_categories']} categories searched on average "
        f"(histogram {s1['categories_histogram']}), category recall (share of the true top 10 inside "
        f"them) {s1['category_recall']:.3f}, stage 1 p50 {s1['p50_ms']:.2f} ms.",
        f"Baselines: the per-model HNSW index (`ann`) is built with the per-category graphs' m "
        f"{r['global_hnsw']['m']} / ef_construction {r['global_hnsw']['ef_construction']}; the tuned row "
        f"uses the smallest hnsw.ef_search reaching two_stage pgvector's recall "
        f"({t['target_recall']:.3f}) on {t['calibration_queries']} separate queries: ef_search "
        f"{t['ef_search']} (recall there {t['recall_at_ef']:.3f}).",
        "Builds: " + ", ".join(f"{k} {v} s" for k, v in r["build_s"].items()) + ".",
    ]
    lines += rules_lines(r)
    before = HISTORY / f"{d['kind']}-{d['rows']}-before-0004.json"
    if before.exists():
        b = json.loads(before.read_text())
        pairs = [
            (label, b["service"].get(label), r["service"].get(label), b["http"].get(label), r["http"].get(label))
            for label in ("exact", "ann pgvector", "two_stage pgvector", "two_stage FAISS")
        ]
        lines += [
            "",
            f"Before the fixes (`{before.relative_to(RESULTS.parents[2])}`, measured on commit {b['code']}): "
            + "; ".join(
                f"{label} {ob['p50_ms']:.1f} -> {nb['p50_ms']:.1f} ms service, "
                f"{oh['p50_ms']:.1f} -> {nh['p50_ms']:.1f} ms HTTP"
                for label, ob, nb, oh, nh in pairs
                if ob and nb and oh and nh
            )
            + " (p50).",
        ]
    if r.get("sql"):
        lines += [
            "",
            "SQL functions (`imsrc.similar(id, 10, NULL, mode)` from a plain psycopg client, one statement "
            "and commit per query, `imsrc.*` settings set to the service's; db/README.md), same queries:",
            "",
            "| function | p50 ms | p95 ms | p99 ms | recall@10 vs exact | same ids and order as the service "
            "| service row | service p50 ms |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for label, m in r["sql"].items():
            svc = r["service"].get(m["service_row"], {})
            lines.append(
                f"| {label} | {m['p50_ms']:.2f} | {m['p95_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['recall_at_10']:.3f} | {m['same_as_service']:.2f} | {m['service_row']} | "
                f"{svc.get('p50_ms', float('nan')):.2f} |"
            )
    if r.get("http"):
        lines += [
            "",
            "HTTP (`imsrc serve` in its own process, `GET /api/search/similar/{id}`, one keep-alive "
            "client; end to end as the client sees it):",
            "",
        ]
        lines += _table(r["http"], "exact", False)
        lines += [
            "",
            f"`/health` answered {r['http_health_s']} s after the server process started; the first FAISS "
            f"query after start took {r['http_first_faiss_query_s']} s (backend pgvector is the default, so "
            "the warm-up does not load FAISS: it is built on first use).",
        ]
    cold = r.get("cold_restart")
    if cold:
        what = {
            "warm_up_off": "warm-up off",
            "warm_up_on": "warm-up on",
            "warm_up_on_after_ready": "warm-up on, first query once `/health/ready` said `search_warm`",
        }
        lines += [
            "",
            "After a PostgreSQL restart (shared_buffers empty, OS page cache still warm) and a fresh "
            "`imsrc serve`, first `similar` query sent as soon as `/health` answered (unless said otherwise), "
            "then 20 more after 10 s: "
            + "; ".join(
                f"{what.get(key, key)}: /health after {c['health_s']} s"
                + (f", warm {c['warm_up_wait_s']} s later" if "warm_up_wait_s" in c else "")
                + f", first query {c['first_query_ms']:.1f} ms, then p50 {c['later_p50_ms']:.1f} ms"
                for key, c in cold.items()
            )
            + ".",
        ]
    if r.get("http_image"):
        lines += [
            "",
            "HTTP `POST /api/search/image` with the PNG (decode + EfficientNet-Lite0 embedding "
            f"included; embed p50 {r.get('http_image_embed_p50_ms', '?')} ms):",
            "",
        ]
        lines += _table(r["http_image"], "exact", False)
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets that these runs can speak to, figure by figure from the results files."""
    real = {r["data"]["rows"]: r for r in results if r["data"]["kind"] == "real"}
    calibrated = [r for r in results if r["data"]["kind"] == "real-calibrated"]
    out = ["### Targets (issue 14) these runs measure", "", "| target | measured | by |", "|---|---|---|"]
    for rows, r in sorted(real.items()):
        h = r.get("http", {})
        cmd = f"`{r['command']}`"
        if "two_stage pgvector" in h and "ann pgvector" in h:
            out.append(
                f"| HTTP `similar`, {rows:,} real images: two_stage <= ann + 1 ms | "
                f"{h['two_stage pgvector']['p50_ms']:.2f} vs {h['ann pgvector']['p50_ms']:.2f} ms p50 "
                f"(answered as `{', '.join(h['two_stage pgvector']['response_mode'])}`) | {cmd} |"
            )
        if "exact" in h and rows <= 3000:  # the target is stated for the 3k catalog of the issue
            out.append(
                f"| HTTP `similar`, exact, {rows:,} real images: <= 10 ms | {h['exact']['p50_ms']:.2f} ms p50 | {cmd} |"
            )
        forced = r["service"].get("two_stage pgvector, small-catalog rule off")
        if forced:
            out.append(
                f"| two-stage neighbour recall@10 vs exact >= 0.98 (target at 70k) | {rows:,}: "
                f"{forced['recall_at_10']:.3f}, stage-1 category recall {r['stage1']['category_recall']:.3f}"
                f" | {cmd} |"
            )
    for r in calibrated:
        forced = r["service"].get("two_stage pgvector, small-catalog rule off")
        if forced:
            out.append(
                f"| two-stage neighbour recall@10 vs exact >= 0.98, real-calibrated data | "
                f"{r['data']['rows']:,}: {forced['recall_at_10']:.3f}, stage-1 category recall "
                f"{r['stage1']['category_recall']:.3f} | `{r['command']}` |"
            )
    return [*out, ""]


def write_markdown() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    # Only service_bench's files (other benchmarks keep theirs beside them, e.g. keywords-*.json).
    results = [r for r in results if isinstance(r.get("data"), dict) and "kind" in r["data"] and "service" in r]
    results.sort(key=lambda r: (r["data"]["kind"] != "real", r["data"]["rows"]))
    body = [
        "Every figure below was written by `bench/search/service_bench.py` (the command is given per table; "
        "each command regenerates its table from scratch: fresh embedded PostgreSQL, fresh catalog, no "
        "reuse). Latencies are what a user gets: through SearchService, and through HTTP. Methods run "
        "interleaved query by query. Raw figures: `bench/search/results/*.json`. Regenerate this section "
        "with `python bench/search/service_bench.py --report`.",
        "",
        "The machine is shared (2 cores, other jobs running): medians of the same command on the same code "
        "moved by up to 1.7x between runs (real 10k, service path: exact 14.8 vs 25.8 ms, ann 4.8 vs 8.7 ms; "
        "HTTP rows moved less). Compare rows within one table, not across tables or runs.",
        "",
    ]
    for r in results:
        body += [*section(r), ""]
    kept = [json.loads(p.read_text()) for p in sorted((RESULTS / "stage1").glob("*.json"))]
    if kept:
        body += [
            "### Stage-1 rules: fixed temperature, calibrated, fixed fan-outs",
            "",
            "The stage-1 rule picks categories by a softmax score mass (IMSRC_SEARCH_SCORE_MASS 0.9, at most "
            "IMSRC_SEARCH_CATEGORIES 3). Its temperature was fixed at 0.05; it is now fitted per catalog at "
            "sync time (search/calibration.py). Label p@10 is the share of the 10 results with the query's "
            "label; recall@10 is against the exact top 10.",
            "",
        ]
        for r in kept:
            body += [*stage1_section(r), ""]
        body += [
            "Reading (reasoned from the figures above, not measured separately): on the 10k real run every "
            "rule keeps label p@10 at or above exact search's (0.814-0.815 vs 0.809). The 0.98 coverage target "
            "cannot be reached with the cap of 3 on these overlapping labels (0.974 on the held-out sample), "
            "so the calibrated temperature (0.067) lands just above the old 0.05 and searches 0.4 more "
            "categories per query for the same recall (0.968); fan-out 1 keeps p@10 but loses a fifth of the "
            "true neighbours. On the 30k real-calibrated vectors (real vectors plus noise, so each base "
            "vector's noisy copies are each other's nearest neighbours) the calibrated default reaches recall "
            "0.975 and p@10 0.901, below exact's 0.910: the default does fall below exact's precision there "
            "(the fixed rule too: 0.899). The short 3k run (30 queries only) shows the same: 0.800 vs "
            "0.810 for the calibrated and the fixed rule and fan-out 3 alike, while fan-out 1 reached 0.867. "
            'So "never below exact\'s precision" holds on the 10k run and not on these two. '
            "On well-separated categories (the synthetic tables) calibration "
            "lowers the temperature and stage 1 searches one category.",
            "",
            "Cold start: with 2 workers at load 15 (10k run) the first query after `search_warm` was the "
            "slowest (106x); with 1 worker (3k runs, `--cold-workers 1`) it was 800 ms vs a 12 ms p50 before "
            "the warm-up ended with `gc.collect(); gc.freeze()` "
            "(`bench/search/results/history/real-3000-cold-before-gc-freeze.json`, load 7-9) and 218 ms vs "
            "22 ms after (the 3k table above, load 5-7): loading the model leaves hundreds of thousands of "
            "objects for the first request's garbage collection to walk. About 200 ms of the first query "
            "remain cold with or without the warm-up (warm-up off: 180 ms vs 11 ms); what they are is not "
            "found yet. Target (<= 10x warm p50): 9.9x after the warm-up in that run, 16x without; not "
            "reliably met.",
            "",
        ]
    body += targets(results)
    body += [
        "### Not measured here",
        "",
        "- 1M and 100k rows, real embeddings beyond 10,000 (the 70k embedding run was stopped at 18k on the "
        "loaded machine; bench/search/real.py resumes from its last 10k checkpoint) and per-category index "
        "build cost per million rows (issue 14 items 2-3 and 5) have no current figures: earlier 1M numbers "
        "came from a lean path (stage 2 alone, no hydration) and a kept database, and were removed. "
        "`--real-calibrated ROWS` (real vectors plus each label's noise) is the mode for sizes beyond 70k.",
        "- A truly cold first query (OS page cache dropped too) is not measured: that needs the whole machine.",
        "- `bench/search/run.py` still measures stage-2 internals (pgvector query shapes, LIST partitions, "
        "the exact-vs-HNSW calibration); its `results.json` is a developer's tool, not a published figure.",
    ]
    replace_section("Search", "\n".join(body))
