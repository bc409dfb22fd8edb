"""load_embedder(): the one function that turns a model name and the user's settings into a loaded model.

Every caller (uploads, folder jobs, `imsrc embed`, search, category text prototypes) loads through here, so
device, precision, weights and any later runtime choice are applied the same way everywhere.
"""

from __future__ import annotations

from typing import Any

from imsrc.config import Settings
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.registry import get_embedder


def load_embedder(name: str, settings: Settings, **options: Any) -> Embedder:
    """The process-wide embedder for `name`, built with the settings' device, precision and weights.

    `options` override single choices (e.g. device="cpu") and are passed through to the registry, so a new
    loading option needs no change in the callers that do not set it."""
    chosen: dict[str, Any] = {
        "device": None if settings.device == "auto" else settings.device,
        "checkpoint": settings.model_checkpoint,
        "precision": settings.precision,
        "cache_dir": settings.model_cache_dir,
        "runtime": settings.inference,  # IMSRC_INFERENCE: torch or ONNX Runtime per tower (embeddings.runtime)
    }
    chosen.update(options)
    return get_embedder(name, **chosen)
