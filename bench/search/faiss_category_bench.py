"""One large FAISS category, old kind (full PQ fast scan) vs new (IVF + PQ fast scan, nprobe calibrated at build).

Builds, through FaissModelIndex (the service's own code), one category of --rows real-calibrated vectors (bench/search
load.real_calibrated on the Fashion-MNIST EfficientNet-Lite0 embeddings of one label) beside nine small categories
(the other labels, --others rows each: flat sub-indexes, whose rows are the "other categories" queries of the
calibration and of the timing). Then times, per kind, query by query with the kinds interleaved:
- member queries: fresh real_calibrated vectors of the same label (not in the index);
- other queries: fresh vectors of the other labels, searched in the large category (what stage 1 does when it adds
  a second or third category);
each through FaissModelIndex.search(q, [category], 15) (the service asks k + max(5, k // 2) for k = 10), and
recall@10 of the first 10 against an exact scan of the category. Prints a table and writes
bench/search/results/faiss-category-<rows>.json.

    python bench/search/faiss_category_bench.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "backend"))

from load import real_calibrated  # noqa: E402

from imsrc.search import faiss_index  # noqa: E402
from imsrc.search.faiss_index import FaissModelIndex  # noqa: E402
from imsrc.search.repository import Watermark  # noqa: E402

DATA = Path("/work/helpers/data/fashion-mnist-efficientnet-lite0-70000.npz")
ASK = 15  # the service's k + max(5, k // 2) for k = 10
K = 10
LARGE = 0  # category id of the large one


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        sys.exit(f"no embeddings at {path} (bench/search/real.py caches them)")
    z = np.load(path)
    return z["vectors"].astype(np.float32), z["labels"].astype(np.int64)


def _build(
    kind: str, vectors: np.ndarray, others: list[np.ndarray], ids_from: int, ivf_min_rows: int
) -> tuple[FaissModelIndex, dict]:
    """kind 'pq' is the code before IVF (every category under IVF_MIN_ROWS); 'ivf' the default."""
    ivf_min_rows = 1 << 62 if kind == "pq" else ivf_min_rows
    index = FaissModelIndex(
        model_id=1,
        model_name="bench",
        dimension=vectors.shape[1],
        flat_max_rows=5000,
        watermark=Watermark(0, (), None, 0),
        ivf_min_rows=ivf_min_rows,
    )
    next_id = ids_from
    for c, rows in enumerate(others, start=1):
        index.add_category(c, np.arange(next_id, next_id + len(rows), dtype=np.int64), rows)
        next_id += len(rows)
    started = time.perf_counter()
    index.add_category(LARGE, np.arange(len(vectors), dtype=np.int64), vectors, calibrate=False)
    built = time.perf_counter() - started
    calibration = index.calibrate(LARGE)
    facts = {
        "kind": index.subs[LARGE].kind,
        "build_s": round(built, 2),
        "calibrate_s": round(time.perf_counter() - started - built, 2),
        "calibration": calibration,
        "nprobe": index.subs[LARGE].nprobe,
    }
    return index, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--others", type=int, default=2000, help="rows of each of the nine other categories")
    parser.add_argument("--queries", type=int, default=200, help="per group (member, other)")
    parser.add_argument("--label", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--kinds", default="pq,ivf")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--ivf-min-rows", type=int, default=faiss_index.IVF_MIN_ROWS, help="the ivf kind's threshold (to try others)"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    base, labels = _load(args.data)
    mine = labels == args.label
    rng = np.random.default_rng(1)
    large, _ = real_calibrated(args.rows, base[mine], labels[mine], rng)
    other_labels = [int(c) for c in np.unique(labels) if c != args.label]
    others = [real_calibrated(args.others, base[labels == c], labels[labels == c], rng)[0] for c in other_labels]
    members, _ = real_calibrated(args.queries, base[mine], labels[mine], np.random.default_rng(2))
    foreign, _ = real_calibrated(args.queries, base[~mine], labels[~mine], np.random.default_rng(3))
    del base
    groups = {"member": members, "other": foreign}
    truth = {g: np.argsort(-(q @ large.T), axis=1)[:, :K] for g, q in groups.items()}

    kinds = args.kinds.split(",")
    built = {kind: _build(kind, large, others, args.rows, args.ivf_min_rows) for kind in kinds}
    for kind, (_, facts) in built.items():
        print(f"{kind}: {facts}", flush=True)
    faiss.omp_set_num_threads(1)
    times: dict[str, dict[str, list[float]]] = {k: {g: [] for g in groups} for k in kinds}
    recalls: dict[str, dict[str, list[float]]] = {k: {g: [] for g in groups} for k in kinds}
    for _ in range(2):  # warm-up round for the page cache, not recorded
        for kind in kinds:
            built[kind][0].search(members[0], [LARGE], ASK)
    for i in range(args.queries):
        for g, qs in groups.items():
            for kind in kinds:
                index = built[kind][0]
                started = time.perf_counter()
                hits = index.search(qs[i], [LARGE], ASK)
                times[kind][g].append((time.perf_counter() - started) * 1000)
                got = {h[0] for h in hits[:K]}
                recalls[kind][g].append(len(got & set(truth[g][i].tolist())) / K)
    rows = []
    for kind in kinds:
        for g in groups:
            t = np.array(times[kind][g])
            rows.append(
                {
                    "kind": kind,
                    "queries": g,
                    "p50_ms": round(float(np.median(t)), 3),
                    "p95_ms": round(float(np.percentile(t, 95)), 3),
                    "recall_at_10": round(float(np.mean(recalls[kind][g])), 4),
                }
            )
    load_after = os.getloadavg()
    print(f"\n{args.rows} rows, 1280-d, label {args.label}; load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print("| kind | queries | p50 ms | p95 ms | recall@10 vs exact |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['queries']} | {r['p50_ms']} | {r['p95_ms']} | {r['recall_at_10']} |")
    out = args.out or HERE / "results" / f"faiss-category-{args.rows}.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join(["python", "bench/search/faiss_category_bench.py", *sys.argv[1:]]),
                "rows": args.rows,
                "others": args.others,
                "queries_per_group": args.queries,
                "label": args.label,
                "ask": ASK,
                "ivf_min_rows": args.ivf_min_rows,
                "rerank_factor": faiss_index.RERANK_FACTOR,
                "calibration_recall": faiss_index.CALIBRATION_RECALL,
                "builds": {k: v[1] for k, v in built.items()},
                "results": rows,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "cpus": os.cpu_count(),
                "faiss": faiss.__version__,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
