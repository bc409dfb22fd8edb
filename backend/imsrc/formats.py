"""Which files count as images (the formats this process can decode), and process-wide Pillow configuration."""

from __future__ import annotations

import importlib
import threading
import warnings

from PIL import Image, features

BASE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
)
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
AVIF_EXTENSIONS = frozenset({".avif"})

_lock = threading.Lock()
_extensions: frozenset[str] | None = None


def _register_plugins() -> frozenset[str]:
    exts = set(BASE_EXTENSIONS)
    # HEIC/AVIF are optional: Pillow >= 11.2 may decode AVIF itself; pillow-heif / pillow-avif-plugin add them.
    try:
        heif = importlib.import_module("pillow_heif")
        heif.register_heif_opener()
        exts |= HEIF_EXTENSIONS
        if hasattr(heif, "register_avif_opener"):
            heif.register_avif_opener()
            exts |= AVIF_EXTENSIONS
    except Exception:  # not installed, or a broken native library: indexing goes on without it
        pass
    if features.check("avif"):
        exts |= AVIF_EXTENSIONS
    else:
        try:
            importlib.import_module("pillow_avif")
            exts |= AVIF_EXTENSIONS
        except Exception:
            pass
    return frozenset(exts)


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) this process can decode."""
    global _extensions
    with _lock:
        if _extensions is None:
            _extensions = _register_plugins()
        return _extensions


def configure_pillow(max_pixels: int) -> None:
    """Plugins plus the decompression-bomb limit. Process-wide: call it in worker processes and at API start.

    imaging.decode() also checks the limit itself, so an image over it is refused even where this
    was not called."""
    image_extensions()
    Image.MAX_IMAGE_PIXELS = max_pixels
    # imaging.decode refuses an image over the limit itself, with its size; Pillow's warning would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
