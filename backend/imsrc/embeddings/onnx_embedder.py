"""An embedder whose towers run in ONNX Runtime (CPU), with the torch embedder behind it for the rest.

It keeps the torch embedder's name, params, preprocessing and tokenizer, so catalogs, ingest workers and
queries cannot tell the engines apart except by speed; a tower that did not pass verification stays on torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imsrc.embeddings.base import Preprocess, TorchEmbedder
from imsrc.embeddings.errors import TextNotSupportedError
from imsrc.embeddings.onnx_export import INPUT_NAMES, OUTPUT_NAME, short_tokens


def cpu_threads() -> int:
    """Same rule as configure_torch_threads: every CPU this process may use, unless OMP_NUM_THREADS says."""
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity API
        return max(1, os.cpu_count() or 1)


def make_session(path: Path) -> Any:
    import onnxruntime as ort

    from imsrc.embeddings.onnx_layout import external_data_copy

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = cpu_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    # No busy-waiting between runs: ORT's idle threads otherwise spin after every call, taking the cores from
    # what runs next in this process (stage-1/2 search after a query, torch for a tower left on torch) and from
    # the ingest workers. Measured on the 2-core box: a torch call right after a spinning ORT call took 56 ms
    # instead of 28 ms, while ORT itself lost nothing measurable without spinning (BENCHMARKS.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(external_data_copy(path)), opts, providers=["CPUExecutionProvider"])


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


class SingleQuery:
    """Batch-1 calls through an IO binding with a preallocated output, one per thread: a query allocates
    nothing but its input and the returned vector (session.run would allocate outputs on every call)."""

    def __init__(self, session: Any, input_name: str, dimension: int) -> None:
        self.session = session
        self.input_name = input_name
        self.dimension = dimension
        self._local = threading.local()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        state = getattr(self._local, "state", None)
        if state is None:
            out = np.empty((1, self.dimension), dtype=np.float32)
            binding = self.session.io_binding()
            binding.bind_output(OUTPUT_NAME, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            state = self._local.state = (binding, out)
        binding, out = state
        binding.bind_cpu_input(self.input_name, x)
        self.session.run_with_iobinding(binding)
        norm = float(np.sqrt(np.dot(out[0], out[0])))
        return out / max(norm, 1e-12)  # a new array: the buffer is reused by the next call


class OnnxEmbedder:
    """Implements the Embedder protocol; see the module docstring."""

    def __init__(
        self, base: TorchEmbedder, sessions: dict[str, Any], runtime: dict[str, str], fingerprint: str
    ) -> None:
        self.base = base
        self.fingerprint = fingerprint  # of the torch weights the exports were made from (onnx_cache)
        self.name = base.name
        self.dimension = base.dimension
        self.supports_text = base.supports_text
        self.family = base.family
        self.params: dict[str, Any] = base.params
        self.preprocess: Preprocess = base.preprocess
        self.runtime = dict(runtime)
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self._sessions = sessions
        self._single = {tower: SingleQuery(s, INPUT_NAMES[tower], base.dimension) for tower, s in sessions.items()}
        for tower in sessions:  # warm: the first run sizes ORT's memory arena and picks kernels
            if tower == "image":
                size = int(base.params.get("image_size", 224))
                self._run(tower, np.zeros((1, 3, size, size), dtype=np.float32))
            else:
                tokens = base.tokenize([""])
                short = short_tokens(tokens) if tower == "text-short" else None
                self._run(tower, (tokens if short is None else short).numpy())

    def weights_present(self) -> bool:
        return True

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            return self._single[tower](x)
        out = self._sessions[tower].run([OUTPUT_NAME], {INPUT_NAMES[tower]: x})[0]
        return normalise(out)

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        if "image" not in self._sessions:
            return self.base.encode_images(batch)
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()  # shares memory when already so
        return self._run("image", x)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not self.supports_text:
            raise TextNotSupportedError(self.name)
        if "text" not in self._sessions:
            return self.base.encode_texts(texts)
        tokens = self.base.tokenize(list(texts))
        short = short_tokens(tokens) if "text-short" in self._sessions else None
        if short is not None:
            return self._run("text-short", np.ascontiguousarray(short.numpy()))
        return self._run("text", np.ascontiguousarray(tokens.numpy()))

    def __repr__(self) -> str:
        return f"OnnxEmbedder(name={self.name!r}, runtime={self.runtime})"
