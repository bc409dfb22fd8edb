"""ViT-B-32 image tower (and EfficientNet-Lite0): which ONNX Runtime / exporter / torch settings are fastest.

Usage: PYTHONPATH=backend python bench/embed/vit_options.py [--sizes 1,16,32,64] [--repeats 5] [--variants ...]
Writes bench/embed/vit-options.json (no BENCHMARKS.md section; the reading there is written by hand).

Every variant runs interleaved with the product's torch path in one process (each repeat runs every variant once,
so load swings on the shared machine hit them alike), and every ONNX variant is checked against torch on the 64
bench photos (per-image cosine, top-10 neighbour overlap) before its speed means anything.

ONNX variants (all on the product's export unless named otherwise):
  onnx             the product: image.onnx (fused attention, TorchScript exporter), make_session's options
  onnx-1thread     the same on one thread (against torch-1thread: the engines without the thread hand-offs)
  onnx-spin        the same with ORT's intra-op threads spinning between runs (the product turns it off)
  onnx-noprepack   session.disable_prepacking=1 (ORT pre-packs MatMul weights by default; this shows its worth)
  onnx-noarena     enable_cpu_mem_arena off
  onnx-extended    ORT_ENABLE_EXTENDED instead of ORT_ENABLE_ALL (no NCHWc layout transforms)
  onnx-opt-vit     onnxruntime.transformers.optimizer (model_type vit) applied to image.onnx
  onnx-opt-clip    the same with model_type clip
  onnx-dynamo      the dynamo exporter (torch.onnx.export(dynamo=True), needs onnxscript) on the unmodified tower
  onnx-dynamo-opt  the dynamo export through the transformer optimizer (model_type vit)
Torch variants:
  torch            the product: inference_mode, threads = cores
  torch-1thread    the same on one thread (set around each call)
  torch-cl         channels_last input and weights (relevant for the convolutional model)
  torch-cl-1thread the same on one thread
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import machine, write_json
from engines import EXPORTS, MODELS, agreement, embed_all
from pool import image_pool

from imsrc.embeddings import build_embedder
from imsrc.embeddings.base import TorchEmbedder
from imsrc.embeddings.onnx_cache import ExportStore, weights_fingerprint
from imsrc.embeddings.onnx_embedder import cpu_threads, normalise
from imsrc.embeddings.onnx_export import INPUT_NAMES, OUTPUT_NAME, _export_mode

RESULTS = Path(__file__).resolve().parent / "vit-options.json"
ALL = [
    "torch",
    "torch-1thread",
    "torch-cl",
    "torch-cl-1thread",
    "onnx",
    "onnx-1thread",
    "onnx-spin",
    "onnx-noprepack",
    "onnx-noarena",
    "onnx-extended",
    "onnx-opt-vit",
    "onnx-opt-clip",
    "onnx-dynamo",
    "onnx-dynamo-opt",
]


def session(path: Path, **changes: Any) -> Any:
    """make_session's options (the product's), with `changes` applied."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = changes.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = changes.get("threads", cpu_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = changes.get("arena", True)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if changes.get("spin") else "0")
    if changes.get("noprepack"):
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Runner:
    def __init__(self, fn: Callable[[torch.Tensor], np.ndarray], info: dict[str, Any] | None = None) -> None:
        self.encode_images = fn
        self.info = info or {}


def onnx_runner(sess: Any, info: dict[str, Any] | None = None) -> Runner:
    name = INPUT_NAMES["image"]
    return Runner(lambda x: normalise(sess.run([OUTPUT_NAME], {name: x.contiguous().numpy()})[0]), info)


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda t: -t[1]))


def transformer_optimized(src: Path, dst: Path, model_type: str) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    if not dst.exists():
        # ViT-B-32: 12 heads of 64 (open_clip's width 768); opt_level 0 = the Python fusions only, ORT's own
        # graph optimisation runs at session creation as usual.
        model = optimize_model(str(src), model_type=model_type, num_heads=12, hidden_size=768, opt_level=0)
        model.save_model_to_file(str(dst))
        return {"fused": {k: int(v) for k, v in (model.get_fused_operator_statistics() or {}).items()}}
    return {}


def dynamo_export(base: TorchEmbedder, dst: Path) -> None:
    if dst.exists():
        return
    x = torch.stack([base.preprocess(im) for im in image_pool()[:2]])
    batch = torch.export.Dim("batch", min=1, max=1024)
    with _export_mode():
        program = torch.onnx.export(
            base.image_graph().eval(),
            (x,),
            input_names=[INPUT_NAMES["image"]],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            optimize=True,
        )
    assert program is not None
    program.save(str(dst))


def build(label: str, names: list[str]) -> tuple[dict[str, Runner], TorchEmbedder, dict[str, Any]]:
    registered = MODELS[label][0]
    base = build_embedder(registered, runtime="torch", device="cpu")
    assert isinstance(base, TorchEmbedder)
    product = build_embedder(registered, runtime="onnx", device="cpu", export_dir=EXPORTS)  # makes image.onnx
    del product
    gc.collect()
    store = ExportStore(EXPORTS, base.name, weights_fingerprint(base.module))
    src = store.model_path("image", "fp32")
    info: dict[str, Any] = {"export_nodes": {"onnx": op_counts(src)}}
    runners: dict[str, Runner] = {}
    threads = torch.get_num_threads()

    def one_thread(fn: Callable[[torch.Tensor], np.ndarray]) -> Callable[[torch.Tensor], np.ndarray]:
        def run(x: torch.Tensor) -> np.ndarray:
            torch.set_num_threads(1)
            try:
                return fn(x)
            finally:
                torch.set_num_threads(threads)

        return run

    for name in names:
        try:
            if name == "torch":
                runners[name] = Runner(base.encode_images)
            elif name == "torch-1thread":
                runners[name] = Runner(one_thread(base.encode_images))
            elif name in ("torch-cl", "torch-cl-1thread"):
                cl = build_embedder(registered, runtime="torch", device="cpu")
                assert isinstance(cl, TorchEmbedder)
                cl.module = cl.module.to(memory_format=torch.channels_last)
                cl._channels_last = True  # what the CUDA path does: input and weights channels_last
                runners[name] = Runner(cl.encode_images if name == "torch-cl" else one_thread(cl.encode_images))
            elif name == "onnx":
                runners[name] = onnx_runner(session(src))
            elif name == "onnx-1thread":
                runners[name] = onnx_runner(session(src, threads=1))
            elif name == "onnx-spin":
                runners[name] = onnx_runner(session(src, spin=True))
            elif name == "onnx-noprepack":
                runners[name] = onnx_runner(session(src, noprepack=True))
            elif name == "onnx-noarena":
                runners[name] = onnx_runner(session(src, arena=False))
            elif name == "onnx-extended":
                import onnxruntime as ort

                runners[name] = onnx_runner(session(src, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
            elif name.startswith("onnx-opt-"):
                kind = name.removeprefix("onnx-opt-")
                dst = store.dir / f"bench-image-opt-{kind}.onnx"
                info[name] = transformer_optimized(src, dst, kind)
                info["export_nodes"][name] = op_counts(dst)
                runners[name] = onnx_runner(session(dst))
            elif name == "onnx-dynamo":
                dst = store.dir / "bench-image-dynamo.onnx"
                t0 = time.perf_counter()
                dynamo_export(base, dst)
                info[name] = {"export_s": round(time.perf_counter() - t0, 1)}
                info["export_nodes"][name] = op_counts(dst)
                runners[name] = onnx_runner(session(dst))
            elif name == "onnx-dynamo-opt":
                src_d = store.dir / "bench-image-dynamo.onnx"
                dynamo_export(base, src_d)
                dst = store.dir / "bench-image-dynamo-opt-vit.onnx"
                info[name] = transformer_optimized(src_d, dst, "vit")
                info["export_nodes"][name] = op_counts(dst)
                runners[name] = onnx_runner(session(dst))
        except Exception as exc:  # a variant that cannot be built is reported, the others still run
            info.setdefault("failed", {})[name] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            traceback.print_exc()
        print(f"  built {name}", flush=True)
    return runners, base, info


def interleaved(
    runners: dict[str, Runner], x: torch.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call. On the shared machine wall time follows other people's load; the process's
    CPU time is the work itself (ONNX Runtime runs without spinning, so idle threads add nothing; torch's OpenMP
    threads do spin briefly at each barrier, which counts)."""
    for r in runners.values():
        r.encode_images(x)  # warm: kernel choice, arena growth
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for key, r in runners.items():
            c0, t0 = time.process_time(), time.perf_counter()
            r.encode_images(x)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", choices=list(MODELS))
    ap.add_argument("--sizes", default="1,16,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--build-only", action="store_true", help="make the exports and check agreement, no timing")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [v for v in args.variants.split(",") if v]
    import onnxruntime

    started, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    runners, base, info = build(args.model, names)
    photos = image_pool()
    pool = torch.stack([base.preprocess(im) for im in photos])
    res: dict[str, Any] = {
        "command": "python bench/embed/vit_options.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "model": args.model,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "build": info,
        "throughput": [],
    }
    vecs = {k: embed_all(r, photos, base.preprocess) for k, r in runners.items()}
    res["agreement"] = {k: agreement(vecs["torch"], v) for k, v in vecs.items() if k != "torch"}
    print(f"  agreement: {res['agreement']}", flush=True)
    if args.build_only:
        print(info, flush=True)
        return
    for bs in sizes:
        times, cpu = interleaved(runners, pool[:bs].contiguous(), args.repeats)
        row: dict[str, Any] = {"batch": bs, "load_1m": round(os.getloadavg()[0], 2)}
        row.update({k: round(bs / statistics.median(v), 2) for k, v in times.items()})
        row["vs_torch"] = {k: round(row[k] / row["torch"], 2) for k in times if k != "torch"}
        row["cpu_ms_per_image"] = {k: round(1000 * statistics.median(v) / bs, 1) for k, v in cpu.items()}
        res["throughput"].append(row)
        print(f"  batch {bs}: {row}", flush=True)
    res["load_1m"] = [load0, round(os.getloadavg()[0], 2)]
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(Path(args.out), res)
    print(f"wrote {args.out} in {res['elapsed_s']} s", flush=True)


if __name__ == "__main__":
    main()
