"""Image (and text) embedding models behind one small protocol; see registry for the public names."""

from imsrc.embeddings.base import Embedder, ModelInfo
from imsrc.embeddings.errors import (
    ModelError,
    TextNotSupportedError,
    UnknownModelError,
    WeightsUnavailableError,
)
from imsrc.embeddings.loading import load_embedder
from imsrc.embeddings.registry import (
    AUTO,
    build_embedder,
    encode_text_query,
    get_embedder,
    known_models,
    model_info,
    resolve_model_name,
    weights_present,
)

__all__ = [
    "AUTO",
    "Embedder",
    "ModelError",
    "ModelInfo",
    "TextNotSupportedError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "build_embedder",
    "encode_text_query",
    "get_embedder",
    "known_models",
    "load_embedder",
    "model_info",
    "resolve_model_name",
    "weights_present",
]
