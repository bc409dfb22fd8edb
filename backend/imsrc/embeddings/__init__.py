"""Image (and text) embedding models behind one small protocol; see registry for the public names.

The names below are loaded on first use (PEP 562): importing this package, or one of its light modules such as
`imsrc.embeddings.errors`, must not import the registry's model code, and never torch (see embeddings.direct)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "Embedder": "base",
    "ModelInfo": "base",
    "ModelError": "errors",
    "TextNotSupportedError": "errors",
    "UnknownModelError": "errors",
    "WeightsUnavailableError": "errors",
    "load_embedder": "loading",
    "AUTO": "registry",
    "build_embedder": "registry",
    "encode_text_query": "registry",
    "get_embedder": "registry",
    "known_models": "registry",
    "model_info": "registry",
    "resolve_model_name": "registry",
    "weights_present": "registry",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"imsrc.embeddings.{home}"), name)
