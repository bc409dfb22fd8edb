"""open_clip models (CLIP, SigLIP, ...): image and text embeddings in one space.

Weights come from open_clip's own download/cache, from the Hugging Face cache, or from a local file.
When they are already cached we hand open_clip the cached path instead of the tag, because open_clip's
download path asks the Hub first and, offline, spends ~25 s in retries before falling back to the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import open_clip
import torch
from torchvision import transforms as T

from imsrc.embeddings.errors import UnknownModelError, WeightsUnavailableError
from imsrc.embeddings.sources import (
    HF_HUB_PREFIX,
    TINY_CONFIG,
    TINY_CONFIG_NAME,
    needs_tag_cfg,
    open_clip_local,
)
from imsrc.embeddings.torch_base import TorchEmbedder

log = logging.getLogger(__name__)

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


def _tag_cfg(model: str, tag: str) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = [f"open_clip:{model}:{t}" for t in open_clip.list_pretrained_tags_by_model(model)]
        raise UnknownModelError(f"open_clip:{model}:{tag}", known)
    return dict(cfg)


def tag_cfg_for(model: str, pretrained: str | None, checkpoint: str | None) -> dict[str, Any] | None:
    """The pretrained tag's config where resolving the weights needs it (sources.open_clip_local)."""
    if pretrained and needs_tag_cfg(model, pretrained, checkpoint):
        return _tag_cfg(model, pretrained)
    return None


def local_source(
    model: str, pretrained: str | None, checkpoint: str | None = None, cache_dir: str | None = None
) -> dict[str, Any] | None:
    """Arguments for open_clip.create_model_and_transforms that need no network, or None if not cached."""
    return open_clip_local(model, pretrained, checkpoint, cache_dir, tag_cfg_for(model, pretrained, checkpoint))


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
        tag_cfg = tag_cfg_for(model, pretrained, checkpoint)
        kwargs = open_clip_local(model, pretrained, checkpoint, cache_dir, tag_cfg)
        # What fixes these weights, for loads that skip torch (embeddings.direct); none after a download.
        self.source: dict[str, Any] | None = (
            None if kwargs is None else {"model": model, "pretrained": pretrained, "tag_cfg": tag_cfg}
        )
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
        self.tokenizer_args = {
            "model_name": kwargs["model_name"],
            "cache_dir": cache_dir,
            "tiny": model == TINY_CONFIG_NAME,
        }
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
