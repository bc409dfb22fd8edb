"""Stage-1 rules compared offline on the cached real embeddings (no database): what each rule would pick and
what an exact search inside the picked categories would return. It is the upper bound of the service's
two-stage (stage 2 exact inside the categories), used to choose the rule; bench/search/service_bench.py measures
the service itself.

    PYTHONPATH=backend python bench/search/stage1_offline.py 10000 --queries 2000

Prototypes are computed as the service's sync does (search/prototypes.py, default settings); the calibration is
search/calibration.py's (held-out members, sample of 2,000) on the same vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.search import real  # noqa: E402

from imsrc.catalog.prototypes import PrototypeRow  # noqa: E402
from imsrc.config import Settings  # noqa: E402
from imsrc.search import calibration  # noqa: E402
from imsrc.search.prototypes import compute_prototypes  # noqa: E402

K = 10


def prototypes(vectors: np.ndarray, labels: np.ndarray, settings: Settings) -> list[PrototypeRow]:
    rows: list[PrototypeRow] = []
    for c in np.unique(labels):
        members = vectors[labels == c]
        rows += compute_prototypes(
            members, max_prototypes=settings.max_prototypes, min_gain=settings.prototype_min_gain, category_id=int(c)
        )
    return rows


def category_scores(q: np.ndarray, protos: list[PrototypeRow]) -> tuple[np.ndarray, np.ndarray]:
    owners = np.array([p.category_id for p in protos])
    matrix = np.stack([p.vector for p in protos]).astype(np.float32)
    sims = q @ matrix.T
    cats = np.unique(owners)
    out = np.stack([sims[:, owners == c].max(axis=1) for c in cats], axis=1)
    return out, cats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", type=int)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--real-calibrated",
        type=int,
        default=0,
        metavar="N",
        help="N vectors made from the `rows` real ones plus noise (bench/search/load.real_calibrated), as the service "
        "bench's --real-calibrated N --real-base rows",
    )
    a = p.parse_args()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    if real._cached(a.rows) is None:
        raise SystemExit(f"no cached embeddings of {a.rows} images yet: python bench/search/real.py {a.rows}")
    vectors, labels, _ = real.embed(a.rows)
    sources = None
    if a.real_calibrated:
        from bench.search.load import real_calibrated_with_sources

        vectors, labels, sources = real_calibrated_with_sources(
            a.real_calibrated, vectors, labels, np.random.default_rng(2)
        )
    t0 = time.perf_counter()
    protos = prototypes(vectors, labels, settings)
    rng = np.random.default_rng(5)
    # Calibration: 2,000 members held out of their own prototypes (calibration.calibrate, without the database).
    sample = np.sort(rng.choice(len(vectors), min(calibration.SAMPLE, len(vectors)), replace=False))
    sv, so = vectors[sample], labels[sample]
    own_cos = {}
    for j, row in enumerate(protos):
        mine = so == row.category_id
        if mine.any():
            own_cos[(row.category_id, j)] = float(np.mean(sv[mine] @ row.vector))
    held, cats = calibration.held_out_scores(sv, so, protos, own_cos)
    own_col = np.searchsorted(cats, so)
    # Queries: other members (not the calibration sample), exact top 10 without themselves.
    rest = np.setdiff1d(np.arange(len(vectors)), sample)
    qrows = np.sort(rng.choice(rest, min(a.queries, len(rest)), replace=False))
    truth = np.empty((len(qrows), K), dtype=np.int64)
    for s in range(0, len(qrows), 200):
        block = vectors[qrows[s : s + 200]] @ vectors.T
        block[np.arange(len(block)), qrows[s : s + 200]] = -np.inf
        truth[s : s + 200] = np.argsort(-block, axis=1)[:, :K]
    qscores, _ = category_scores(vectors[qrows], protos)
    order = np.lexsort((np.broadcast_to(np.arange(len(cats)), qscores.shape), -qscores), axis=1)
    ranked = np.take_along_axis(qscores, order, axis=1).astype(np.float64)
    qlab = labels[qrows]
    truth_lab = labels[truth]  # categories = labels here
    exact_per_query = np.mean(truth_lab == qlab[:, None], axis=1)
    exact_p = float(np.mean(exact_per_query))

    # Per query and category: the category's exact top 10 (scores, labels), so a rule's stage 2 (exact inside
    # the picked categories) is a merge of at most 10 x picked candidates.
    cat_top_s = np.empty((len(qrows), len(cats), K), dtype=np.float32)
    cat_top_l = np.empty((len(qrows), len(cats), K), dtype=np.int64)
    members = [np.flatnonzero(labels == c) for c in cats]
    for s in range(0, len(qrows), 250):
        rows = qrows[s : s + 250]
        block = vectors[rows] @ vectors.T
        block[np.arange(len(rows)), rows] = -np.inf
        for j, idx in enumerate(members):
            sub = block[:, idx]
            top = np.argpartition(-sub, K, axis=1)[:, :K]
            cat_top_s[s : s + 250, j] = np.take_along_axis(sub, top, axis=1)
            cat_top_l[s : s + 250, j] = labels[idx[top]]
    truth_in = np.stack([np.isin(truth_lab, [c]).astype(np.float32) for c in cats], axis=2)  # (q, K, C)

    def evaluate(n_pick: np.ndarray, fallback: np.ndarray | None = None) -> dict[str, float]:
        """n_pick: categories per query; fallback: queries answered by searching everything (exact here)."""
        fb = np.zeros(len(qrows), bool) if fallback is None else fallback
        rec = np.empty(len(qrows))
        prec = np.empty(len(qrows))
        for i in range(len(qrows)):
            if fb[i]:
                rec[i], prec[i] = 1.0, float(np.mean(truth_lab[i] == qlab[i]))
                continue
            cols = order[i, : n_pick[i]]
            rec[i] = float(truth_in[i][:, cols].sum() / K)
            s_ = cat_top_s[i, cols].ravel()
            l_ = cat_top_l[i, cols].ravel()
            prec[i] = float(np.mean(l_[np.argsort(-s_)[:K]] == qlab[i]))
        n_eff = np.where(fb, len(cats), n_pick)
        # Paired with exact search on the same queries: the mean difference of label p@10 and its standard
        # error, so "below exact" can be told from the noise of a few thousand queries.
        diff = prec - exact_per_query
        return {
            "label_p_at_10": round(float(np.mean(prec)), 4),
            "p_at_10_minus_exact": round(float(np.mean(diff)), 4),
            "p_at_10_minus_exact_se": round(float(np.std(diff, ddof=1) / np.sqrt(len(diff))), 4),
            "queries_below_exact": int(np.sum(diff < 0)),
            "queries_above_exact": int(np.sum(diff > 0)),
            "recall_at_10": round(float(np.mean(rec)), 4),
            "mean_categories": round(float(np.mean(n_eff)), 3),
            "fallback_share": round(float(np.mean(fb)), 4),
        }

    out: dict[str, object] = {
        "command": " ".join(["python", "bench/search/stage1_offline.py", *sys.argv[1:]]),
        "rows": len(vectors),
        "real_calibrated_from": a.rows if a.real_calibrated else None,
        "queries": len(qrows),
        "exact_label_p_at_10": round(exact_p, 4),
    }
    if sources is not None:
        # Share of the exact top 10 drawn from the query's own real vector (see load.real_calibrated's caveat).
        out["exact_top10_siblings_share"] = round(float(np.mean(sources[truth] == sources[qrows][:, None])), 4)
    mass, cap, target = settings.search_score_mass, settings.search_categories, settings.search_stage1_coverage
    fitted = calibration.fit(held, own_col, mass=mass, cap=cap, target=target)
    out["calibration_cap3"] = fitted
    rules: dict[str, dict[str, float]] = {}
    for f in (1, 2, 3, 4, 5):
        rules[f"fan-out {f}"] = evaluate(np.full(len(qrows), f))
    rules["fixed T 0.05 cap 3"] = evaluate(calibration.picked_counts(ranked, 0.05, mass, cap))
    rules["calibrated cap 3 (old default)"] = evaluate(
        calibration.picked_counts(ranked, fitted["temperature"], mass, cap)
    )
    fits = {}
    for tgt in (0.95, 0.97, 0.98, 0.99, 0.995):
        f = calibration.fit(held, own_col, mass=mass, cap=len(cats), target=tgt)
        fits[str(tgt)] = f
        n = calibration.picked_counts(ranked, f["temperature"], mass, len(cats))
        rules[f"coverage {tgt} uncapped (T {f['temperature']:.4f})"] = evaluate(n)
        for c in (2, 3, 4, 5):
            rules[f"coverage {tgt}, ann over {c}"] = evaluate(np.minimum(n, c), n > c)
    out["calibration_uncapped"] = fits
    out["rules"] = rules
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
