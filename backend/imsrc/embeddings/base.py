"""The Embedder protocol and the small types every model shares; no torch here.

`imsrc.api.app`, the ingest and search services and the CLI import this module, and a process whose towers all run
on ONNX Runtime must never import torch (0.3-0.5 GB per `serve` worker, seconds of start-up): the torch machinery
lives in torch_base, and its old names are still reachable from here, loaded on first use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

Family = Literal["open_clip", "torchvision", "efficientnet"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
# PIL image -> (3, H, W) float32 pixels: a NumPy array (embeddings.preprocess) or a torch tensor (torchvision).
Preprocess = Callable[[Image.Image], Any]


@runtime_checkable
class Embedder(Protocol):
    name: str
    dimension: int
    supports_text: bool
    family: str
    params: dict[str, Any]
    # Which engine computes the vectors, per tower ("torch", "onnx", "onnx-int8"); shown by `imsrc models list`
    # and /api/status. Either engine puts vectors in the same space (verified at export), so it is not a param.
    runtime: dict[str, str]
    # Picklable and free of model references, so ingest workers can run it in other processes.
    preprocess: Preprocess

    # batch: (n, 3, H, W) or (3, H, W) float32, a NumPy array or a torch tensor.
    def encode_images(self, batch: Any) -> np.ndarray: ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def weights_present(self) -> bool: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dimension: int
    supports_text: bool
    weights_present: bool
    family: str
    description: str


class ToRGB:
    """Picklable stand-in for a lambda: grey, palette and RGBA images become 3-channel RGB."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


_TORCH_NAMES = {
    "CPU_AUTO_PRECISION",
    "TorchEmbedder",
    "configure_torch_threads",
    "l2_normalise",
    "resolve_device",
    "resolve_precision",
}


def __getattr__(name: str) -> Any:
    """The torch machinery's old home: `from imsrc.embeddings.base import TorchEmbedder` still works (and imports
    torch, as it always did)."""
    if name in _TORCH_NAMES:
        from imsrc.embeddings import torch_base

        return getattr(torch_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
