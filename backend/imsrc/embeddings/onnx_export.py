"""Export a tower to ONNX once, check it against torch, time both, and (opt-in) quantize it to int8."""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from imsrc.embeddings.onnx_cache import OPSET
from imsrc.embeddings.onnx_names import INPUT_NAMES, OUTPUT_NAME, SHORT_TEXT_TOKENS, short_tokens

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "SHORT_TEXT_TOKENS", "short_tokens"]  # their old home; see onnx_names

# The short text tower also takes any sequence length up to SHORT_TEXT_TOKENS (short_tokens cuts each batch after
# its last end-of-text): a 7-token query costs a third less than at 16 positions (BENCHMARKS.md).
DYNAMIC_AXES = {"text-short": {0: "batch", 1: "sequence"}}
MIN_COSINE = 0.9999  # per item, ONNX fp32 vs torch fp32: the same space, so catalogs mix both engines
# int8 moves vectors by design; below this it is refused (ViT-B-32 dynamic int8 measured 0.9998 on the check
# batch, EfficientNet-Lite0 with int8 convolutions 0.970, bench/embed).
INT8_MIN_COSINE = 0.99
CHECK_BATCH = 8  # differs from the traced batch (2), so the dynamic batch axis is exercised too
TIMING_REPEATS = 3
PROMPTS = [
    "a photo of a cat",
    "a cup of coffee on a table",
    "an astronaut in a white suit",
    "a red rocket on the launch pad",
    "old coins",
    "a page of printed text",
    "a camera man",
    "a diagram",
]

Encode = Callable[[Any], np.ndarray]


def check_images(n: int = CHECK_BATCH) -> list[Image.Image]:
    """Fixed, structured pictures (gradients, discs, stripes): the same on every machine, no data files."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        w, h = 256, 192
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-1.5, 1.5, (3, 2))
        arr = np.stack([(base[c] + x * slope[c, 0] + y * slope[c, 1]) % 256 for c in range(3)], -1)
        im = Image.fromarray(arr.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 60))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
        out.append(im)
    return out


@contextlib.contextmanager
def _export_mode() -> Iterator[None]:
    # nn.MultiheadAttention's inference fast path (_native_multi_head_attention) has no ONNX symbolic; the
    # plain path computes the same attention. The switch is process-wide, so it is restored at once.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export(
    graph: torch.nn.Module,
    example: torch.Tensor,
    tower: str,
    path: Path,
    context: contextlib.AbstractContextManager[Any] | None = None,
) -> None:
    """TorchScript exporter (dynamo=False): it needs no onnxscript and traced every built-in family here;
    batch is the one dynamic axis. `context` (TorchEmbedder.export_context) may swap in export-only modules, such as
    open_clip's attention as ONNX Runtime's fused operator (onnx_attention). Written to a temporary name first, so a
    crash leaves no half file."""
    from imsrc.embeddings.onnx_attention import CUSTOM_OPSETS

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".onnx.tmp{os.getpid()}")
    name = INPUT_NAMES[tower]
    try:
        with _export_mode(), context or contextlib.nullcontext():
            torch.onnx.export(
                graph.eval(),
                (example,),
                str(tmp),
                input_names=[name],
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: DYNAMIC_AXES.get(tower, {0: "batch"}), OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                custom_opsets=CUSTOM_OPSETS,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def quantize(fp32_path: Path, int8_path: Path, op_types: list[str] | None) -> None:
    """Dynamic int8 (weights int8, activations quantized per call): no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = int8_path.with_suffix(f".onnx.tmp{os.getpid()}")
    root = logging.getLogger()
    root.addFilter(_quiet_quantizer)
    try:
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
        os.replace(tmp, int8_path)
    finally:
        root.removeFilter(_quiet_quantizer)
        tmp.unlink(missing_ok=True)


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    # The quantizer logs advice ("consider pre-processing") on the root logger on every call; it is about
    # static calibration, which this dynamic path does not use.
    return "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine of two (n, d) arrays of unit vectors."""
    return np.sum(reference * candidate, axis=1)


def compare(torch_fn: Encode, onnx_fn: Encode, inputs: Any, single: Any) -> dict[str, Any]:
    """Cosine per item on the check batch and on its first item alone (the query path runs batch 1)."""
    ref, got = torch_fn(inputs), onnx_fn(inputs)
    ref1, got1 = torch_fn(single), onnx_fn(single)
    cos = np.concatenate([cosines(ref, got), cosines(ref1, got1)])
    return {"batch": len(ref), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def seconds_per_call(fn: Encode, inputs: Any, repeats: int = TIMING_REPEATS) -> float:
    fn(inputs)  # first call pays for kernel selection and arena growth
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(torch_fn: Encode, onnx_fn: Encode, inputs: Any, batch: int) -> dict[str, Any]:
    """Interleaved medians on the check batch: what `auto` compares (recorded once, at export)."""
    t_torch, t_onnx = seconds_per_call(torch_fn, inputs), seconds_per_call(onnx_fn, inputs)
    return {"batch": batch, "torch_s": t_torch, "onnx_s": t_onnx, "speedup": t_torch / t_onnx if t_onnx else 0.0}
