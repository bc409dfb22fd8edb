"""open_clip models (CLIP, SigLIP, ...): image and text embeddings in one space.

Weights come from open_clip's own download/cache, from the Hugging Face cache, or from a local file.
When they are already cached we hand open_clip the cached path instead of the tag, because open_clip's
download path asks the Hub first and, offline, spends ~25 s in retries before falling back to the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import open_clip
import torch
from torchvision import transforms as T

from imsrc.embeddings.base import TorchEmbedder
from imsrc.embeddings.errors import UnknownModelError, WeightsUnavailableError

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# A deliberately tiny architecture for tests and benchmarks: random init, real forward passes.
TINY_CONFIG_NAME = "imsrc-tiny-test"
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
RANDOM_INIT_SEED = 0
_tiny_lock = threading.Lock()
_tiny_registered = False


def ensure_tiny_config() -> None:
    """Register TINY_CONFIG with open_clip (its registry only reads JSON files)."""
    global _tiny_registered
    with _tiny_lock:
        if _tiny_registered or TINY_CONFIG_NAME in open_clip.list_models():
            _tiny_registered = True
            return
        path = Path(tempfile.mkdtemp(prefix="imsrc-openclip-")) / f"{TINY_CONFIG_NAME}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
        _tiny_registered = True


def _is_random(pretrained: str | None) -> bool:
    return pretrained is None or pretrained.lower() in ("", "none", "random")


def _hf_cached(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _hf_weight_names(filename: str) -> list[str]:
    # Mirrors open_clip's preference for a safetensors twin of a .bin/.pth file.
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _tag_cfg(model: str, tag: str) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = [f"open_clip:{model}:{t}" for t in open_clip.list_pretrained_tags_by_model(model)]
        raise UnknownModelError(f"open_clip:{model}:{tag}", known)
    return dict(cfg)


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    # A file path carries no preprocessing metadata, so restate what the tag would have set.
    return {
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
    }


def local_source(
    model: str, pretrained: str | None, checkpoint: str | None = None, cache_dir: str | None = None
) -> dict[str, Any] | None:
    """Arguments for open_clip.create_model_and_transforms that need no network, or None if not cached."""
    if checkpoint:
        if os.path.isdir(checkpoint):  # an exported open_clip folder: open_clip_config.json + weights
            return {"model_name": f"local-dir:{checkpoint}"}
        if not os.path.isfile(checkpoint):
            return None
        tagged = pretrained is not None and not _is_random(pretrained) and not model.startswith(HF_HUB_PREFIX)
        extra = _tag_cfg(model, pretrained) if tagged and pretrained else {}
        return {"model_name": model, "pretrained": checkpoint, **_preprocess_overrides(extra)}
    if model.startswith(HF_HUB_PREFIX):
        repo = model[len(HF_HUB_PREFIX) :]
        config = _hf_cached(repo, ["open_clip_config.json"], cache_dir)
        weights = _hf_cached(repo, _hf_weight_names("open_clip_pytorch_model.bin"), cache_dir)
        if config and weights and Path(config).parent == Path(weights).parent:
            return {"model_name": f"local-dir:{Path(config).parent}"}
        return None
    if _is_random(pretrained):
        return {"model_name": model, "pretrained": None}
    assert pretrained is not None
    cfg = _tag_cfg(model, pretrained)
    path: str | None = None
    if cfg.get("hf_hub"):
        # open_clip's convention: "org/repo/" means the default weights file, "org/repo/file" a named one.
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        path = _hf_cached(repo, _hf_weight_names(filename), cache_dir)
    if path is None and cfg.get("url"):
        candidate = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        path = candidate if os.path.isfile(candidate) else None
    if path is None:
        return None
    return {"model_name": model, "pretrained": path, **_preprocess_overrides(cfg)}


def weights_present(
    model: str, pretrained: str | None, checkpoint: str | None = None, cache_dir: str | None = None
) -> bool:
    return local_source(model, pretrained, checkpoint, cache_dir) is not None


def _crop_size(preprocess: Any, default: int = 224) -> int:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.CenterCrop):
            return int(t.size[0])
    return default


class ImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)  # type: ignore[operator]


class TextTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)  # type: ignore[operator]


class ShortTextTower(torch.nn.Module):
    """CLIP's text encoder on the token positions up to the batch's last end-of-text token (at most `length`).

    open_clip's CLIP text transformer is causal and pools the end-of-text token, so positions after it never reach
    the output, yet encode_text always runs all 77. A query that ends within `length` tokens (most do: 16 covers
    14 word pieces) gets the same vector from this tower at a fraction of the cost, and the cost follows its own
    length ("a photo of a cat" is 7 positions). It mirrors open_clip.model.CLIP.encode_text with the positional
    embedding and the causal mask cut to the input's length, and is used only through the ONNX export (sequence
    length a dynamic axis), whose verification against the full-length torch output, at two different lengths,
    decides whether it stands."""

    def __init__(self, clip: torch.nn.Module, length: int) -> None:
        super().__init__()
        self.clip = clip
        self.length = length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        clip: Any = self.clip
        n = tokens.shape[1]  # traced as the input's size: a dynamic axis of the export
        x = clip.token_embedding(tokens)
        x = x + clip.positional_embedding[:n]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type)
        if isinstance(clip.text_projection, torch.nn.Linear):
            return clip.text_projection(x)
        return x @ clip.text_projection


def short_text_capable(clip: torch.nn.Module, length: int) -> bool:
    """ShortTextTower computes this model's text features: open_clip's CLIP class with a causal mask, end-of-text
    (argmax) pooling and no class token, and a context longer than `length`."""
    return (
        isinstance(clip, open_clip.model.CLIP)
        and getattr(clip, "text_pool_type", None) == "argmax"
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "cls_emb", None) is None
        and int(clip.positional_embedding.shape[0]) > length
    )


class OpenClipEmbedder(TorchEmbedder):
    family = "open_clip"
    supports_text = True

    def __init__(
        self,
        name: str,
        model: str,
        pretrained: str | None,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        checkpoint: str | None = None,
        cache_dir: str | None = None,
        allow_download: bool = True,
    ) -> None:
        if model == TINY_CONFIG_NAME:
            ensure_tiny_config()
        kwargs = local_source(model, pretrained, checkpoint, cache_dir)
        if kwargs is None:
            if checkpoint:
                raise WeightsUnavailableError(name, f"checkpoint not found: {checkpoint}")
            if not allow_download:
                raise WeightsUnavailableError(name, "not in the local cache and downloads are disabled")
            kwargs = {"model_name": model, "cache_dir": cache_dir}
            if not model.startswith(HF_HUB_PREFIX):
                kwargs["pretrained"] = pretrained
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "pretrained"}
        random_init = kwargs.get("pretrained", "") is None
        try:
            # Seeded in a forked RNG so random-init models are identical in every process
            # without disturbing the caller's global RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                clip, _, preprocess = open_clip.create_model_and_transforms(**kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise WeightsUnavailableError(name, str(exc)) from exc
        self._tokenizer = open_clip.get_tokenizer(kwargs["model_name"], cache_dir=cache_dir)
        image_size = _crop_size(preprocess)
        params: dict[str, Any] = {
            "family": self.family,
            "architecture": model,
            "pretrained": "random-init" if random_init else (pretrained or model),
            "image_size": image_size,
            "preprocess": repr(preprocess).replace("\n", " "),
        }
        if random_init:
            params["seed"] = RANDOM_INIT_SEED
        # Warm-up pass on a blank image: learns the output width for any architecture and keeps the
        # one-off allocation cost away from the first real request.
        with torch.inference_mode():
            probe = clip.eval().encode_image(torch.zeros(1, 3, image_size, image_size))
        super().__init__(
            name=name,
            dimension=int(probe.shape[-1]),
            module=clip,
            preprocess=preprocess,
            params=params,
            device=device,
            precision=precision,
        )
        self._image_tower = ImageTower(self.module)
        self._text_tower = TextTower(self.module)

    def image_graph(self) -> torch.nn.Module:
        return self._image_tower

    def text_graph(self) -> torch.nn.Module:
        return self._text_tower

    def short_text_graph(self, length: int) -> torch.nn.Module | None:
        return ShortTextTower(self.module, length) if short_text_capable(self.module, length) else None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens: torch.Tensor = self._tokenizer(texts)
        return tokens

    def export_context(self, tower: str) -> contextlib.AbstractContextManager[Any]:
        """Attention exported as ONNX Runtime's fused operator (onnx_attention); the export is verified against
        this model's own torch output as usual."""
        from imsrc.embeddings.onnx_attention import fused_attention

        clip: Any = self.module
        if tower == "image" and isinstance(getattr(clip, "visual", None), torch.nn.Module):
            return fused_attention(clip.visual)
        if tower in ("text", "text-short") and isinstance(getattr(clip, "transformer", None), torch.nn.Module):
            return fused_attention(clip.transformer, getattr(clip, "attn_mask", None))
        return contextlib.nullcontext()
