"""The shared torch inference machinery (TorchEmbedder). Imported only by code that runs a model on torch: a
process whose towers all run on ONNX Runtime never imports it (see embeddings.direct)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from imsrc.embeddings.base import Preprocess
from imsrc.embeddings.errors import TextNotSupportedError

_threads_lock = threading.Lock()
_threads_configured = False


def configure_torch_threads() -> None:
    """Use every CPU this process may run on, once; an explicit OMP_NUM_THREADS wins."""
    global _threads_configured
    with _threads_lock:
        if _threads_configured:
            return
        _threads_configured = True
        if os.environ.get("OMP_NUM_THREADS"):
            return
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS and Windows have no affinity API
            n = os.cpu_count() or 1
        torch.set_num_threads(max(1, n))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# precision="auto" on CPU stays fp32. bench/embed/run.py on the 2-core AMX dev box (BENCHMARKS.md,
# "Embedding throughput"): bf16 weights are faster (EfficientNet-Lite0 b64 18 -> 35 img/s, ViT-B-32
# b32 26 -> 135 img/s) but NOT neighbour-identical: top-1 neighbour changed for 1 of 64 queries and
# top-10 overlap was 0.98-0.99 (min cosine to fp32 0.9956 for EfficientNet). The flips were between
# near-tied edits of the same photo (own-photo recall unchanged), so bf16 is a fine opt-in for speed,
# but the default must not make stored vectors depend on the CPU's bf16 support.
# On CUDA fp16 autocast is the long-standing safe inference default for these models.
CPU_AUTO_PRECISION: Literal["fp32", "bf16"] = "fp32"


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else CPU_AUTO_PRECISION
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be one of fp32, bf16, fp16, auto; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    return precision  # type: ignore[return-value]


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)


class TorchEmbedder:
    """Common inference path: eval mode, inference_mode, autocast and device placement.

    Subclasses implement ``_image_features`` (and ``_text_features`` when they support text).
    Instances are safe to call from several threads: forward passes share read-only weights and
    autocast state is thread-local.
    """

    family: str = ""
    supports_text: bool = False

    def __init__(
        self,
        *,
        name: str,
        dimension: int,
        module: torch.nn.Module,
        preprocess: Preprocess,
        params: dict[str, Any],
        device: str | torch.device | None = None,
        precision: str = "auto",
    ) -> None:
        configure_torch_threads()
        self.name = name
        self.dimension = dimension
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.preprocess = preprocess
        self.params = params
        self._channels_last = self.device.type == "cuda"
        # bf16 on CPU casts the weights instead of using autocast: measured on the AMX dev box, autocast
        # re-casts every weight on every call and was slower than fp32 at batch >= 8 (ViT-B-32 b32: 15-22
        # vs 33 img/s), while bf16 weights ran at ~150 img/s. On CUDA autocast is the usual fast path.
        self._weights_dtype = torch.bfloat16 if (self.precision == "bf16" and self.device.type == "cpu") else None
        self._autocast_dtype: torch.dtype | None = None
        if self._weights_dtype is None and self.precision != "fp32":
            self._autocast_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        module = module.eval().to(self.device)
        if self._weights_dtype is not None:
            module = module.to(self._weights_dtype)
        if self._channels_last:
            module = module.to(memory_format=torch.channels_last)
        # Typed loosely: subclasses call architecture-specific methods (encode_image, extract_features).
        self.module: Any = module
        self.runtime = {"image": "torch", **({"text": "torch"} if self.supports_text else {})}

    def weights_present(self) -> bool:
        # A built embedder always has its weights (or is an intentionally random test model).
        return True

    def release_weights(self) -> None:
        """Free the torch weights once every tower runs elsewhere (ONNX Runtime holds its own copy). ViT-B-32's
        resident memory after load: torch alone 0.67 GB, ONNX with the torch copy kept 1.64 GB, freed 1.26 GB (the
        ONNX files, incl. the short text tower's second copy of the text weights, are the rest). The module keeps
        its structure on the meta device, so a stray torch call fails loudly instead of computing garbage."""
        self.module.to("meta")

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with torch.inference_mode():
            if self._autocast_dtype is None:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype):
                    yield

    def _prepare(self, batch: Any) -> torch.Tensor:
        batch = torch.as_tensor(batch)  # the preprocessing may give NumPy arrays (embeddings.preprocess)
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        batch = batch.to(self.device, dtype=self._weights_dtype or torch.float32, non_blocking=True)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def encode_images(self, batch: Any) -> np.ndarray:
        with self._inference():
            return l2_normalise(self._image_features(self._prepare(batch)))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not self.supports_text:
            raise TextNotSupportedError(self.name)
        with self._inference():
            return l2_normalise(self._text_features(list(texts)))

    def _image_features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.image_graph()(batch)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.text_graph()(self.tokenize(texts).to(self.device))

    # The towers as plain modules (input tensor -> unnormalised features): what the ONNX exporter traces, and
    # what the torch path runs, so the two cannot drift apart.
    def image_graph(self) -> torch.nn.Module:
        raise NotImplementedError

    def text_graph(self) -> torch.nn.Module:
        raise TextNotSupportedError(self.name)

    def short_text_graph(self, length: int) -> torch.nn.Module | None:
        """A text tower for tokens cut to `length` (same output for texts that end within it), if the model has one."""
        return None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise TextNotSupportedError(self.name)

    def export_context(self, tower: str) -> contextlib.AbstractContextManager[Any]:
        """Held around the ONNX export of a tower: a model may swap in export-only modules (open_clip: fused
        attention). The torch path never runs inside it."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, precision={self.precision})"
