"""An embedder whose towers run in ONNX Runtime (CPU), with the torch embedder behind it for the rest, or with
nothing behind it when every tower runs on ONNX (embeddings.direct: such a process never imports torch).

It keeps the torch embedder's name, params, preprocessing and tokenizer, so catalogs, ingest workers and
queries cannot tell the engines apart except by speed; a tower that did not pass verification stays on torch.
Each tower's session is made on its first use (the text towers on the first text query: an image-only server
never holds them), once per process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imsrc.embeddings.base import Preprocess
from imsrc.embeddings.errors import TextNotSupportedError
from imsrc.embeddings.onnx_names import INPUT_NAMES, OUTPUT_NAME, short_tokens


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


Tokenize = Callable[[list[str]], Any]  # texts -> (n, context) token ids (a torch tensor or a NumPy array)


class OnnxEmbedder:
    """Implements the Embedder protocol; see the module docstring.

    `towers`: the ONNX file of each tower that runs on ONNX Runtime ("image", "text", "text-short"); `base`: the
    torch embedder for the others (None when there are none); `tokenize`: the model's tokenizer (base's by
    default)."""

    def __init__(
        self,
        *,
        name: str,
        dimension: int,
        supports_text: bool,
        family: str,
        params: dict[str, Any],
        preprocess: Preprocess,
        runtime: dict[str, str],
        fingerprint: str,
        towers: dict[str, Path],
        base: Any = None,
        tokenize: Tokenize | None = None,
    ) -> None:
        self.base = base
        self.fingerprint = fingerprint  # of the torch weights the exports were made from (onnx_cache)
        self.name = name
        self.dimension = dimension
        self.supports_text = supports_text
        self.family = family
        self.params: dict[str, Any] = params
        self.preprocess: Preprocess = preprocess
        self.runtime = dict(runtime)
        self.device = "cpu"
        self.precision = "fp32"
        self.towers = dict(towers)
        self._tokenize = tokenize if tokenize is not None else (base.tokenize if base is not None else None)
        self._lock = threading.Lock()
        self._sessions: dict[str, Any] = {}
        self._single: dict[str, SingleQuery] = {}
        if "image" in self.towers:
            self._session("image")  # what nearly every request needs: ready (and warm) when the model is

    @classmethod
    def around(cls, base: Any, towers: dict[str, Path], runtime: dict[str, str], fingerprint: str) -> OnnxEmbedder:
        """ONNX towers in front of a loaded torch embedder (which runs any tower left on torch)."""
        return cls(
            name=base.name,
            dimension=base.dimension,
            supports_text=base.supports_text,
            family=base.family,
            params=base.params,
            preprocess=base.preprocess,
            runtime=runtime,
            fingerprint=fingerprint,
            towers=towers,
            base=base,
        )

    def weights_present(self) -> bool:
        return True

    def loaded_towers(self) -> list[str]:
        """The towers whose sessions this process holds (made on first use)."""
        with self._lock:
            return sorted(self._sessions)

    def _session(self, tower: str) -> Any:
        session = self._sessions.get(tower)
        if session is not None:
            return session
        with self._lock:  # one session per tower and process, however many requests ask at once
            session = self._sessions.get(tower)
            if session is None:
                session = make_session(self.towers[tower])
                self._single[tower] = SingleQuery(session, INPUT_NAMES[tower], self.dimension)
                self._warm(tower, session)
                self._sessions[tower] = session
        return session

    def _warm(self, tower: str, session: Any) -> None:
        """The first run sizes ORT's memory arena and picks kernels: paid here, not by a request."""
        if tower == "image":
            size = int(self.params.get("image_size", 224))
            x = np.zeros((1, 3, size, size), dtype=np.float32)
        else:
            tokens = self._tokens([""])
            x = tokens if tower == "text" else short_tokens(tokens)
        session.run([OUTPUT_NAME], {INPUT_NAMES[tower]: np.ascontiguousarray(x)})

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        session = self._session(tower)
        if len(x) == 1:
            return self._single[tower](x)
        out = session.run([OUTPUT_NAME], {INPUT_NAMES[tower]: x})[0]
        return normalise(out)

    def _tokens(self, texts: list[str]) -> np.ndarray:
        if self._tokenize is None:
            raise TextNotSupportedError(self.name)
        return np.asarray(self._tokenize(list(texts)), dtype=np.int64)

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return self._tokens(texts)

    def encode_images(self, batch: Any) -> np.ndarray:
        if "image" not in self.towers:
            return np.asarray(self.base.encode_images(batch))
        x = np.asarray(batch, dtype=np.float32)  # a torch tensor on the CPU shares its memory with this view
        if x.ndim == 3:
            x = x[None]
        return self._run("image", np.ascontiguousarray(x))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not self.supports_text:
            raise TextNotSupportedError(self.name)
        if "text" not in self.towers:
            return np.asarray(self.base.encode_texts(texts))
        tokens = self._tokens(list(texts))
        short = short_tokens(tokens) if "text-short" in self.towers else None
        if short is not None:
            return self._run("text-short", np.ascontiguousarray(short))
        return self._run("text", np.ascontiguousarray(tokens))

    def __repr__(self) -> str:
        return f"OnnxEmbedder(name={self.name!r}, runtime={self.runtime})"
