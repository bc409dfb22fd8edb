"""torchvision ResNet-50 (ImageNet) as an image-only embedder: pooled 2048-d features."""

from __future__ import annotations

import os
from typing import Any

import torch
from torchvision import models
from torchvision import transforms as T

from imsrc.embeddings.base import ToRGB
from imsrc.embeddings.errors import WeightsUnavailableError
from imsrc.embeddings.sources import RESNET_DIMENSION, RESNET_NAME
from imsrc.embeddings.torch_base import TorchEmbedder

NAME = RESNET_NAME
DIMENSION = RESNET_DIMENSION
WEIGHTS = models.ResNet50_Weights.IMAGENET1K_V2
# The V2 recipe evaluates at resize 232 -> crop 224 (bilinear), per torchvision's weight metadata.
RESIZE, CROP = 232, 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_preprocess() -> T.Compose:
    return T.Compose(
        [
            ToRGB(),
            T.Resize(RESIZE, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(CROP),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def cached_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))


def weights_present(checkpoint: str | None = None) -> bool:
    return os.path.isfile(checkpoint) if checkpoint else os.path.isfile(cached_weights_path())


def _load_state(checkpoint: str | None, allow_download: bool) -> dict[str, torch.Tensor]:
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise WeightsUnavailableError(NAME, f"checkpoint file not found: {checkpoint}")
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not allow_download and not weights_present():
        raise WeightsUnavailableError(NAME, f"not in the torch hub cache ({cached_weights_path()})")
    try:
        # torchvision's own path: reads the hub cache, downloads into it when missing.
        return WEIGHTS.get_state_dict(progress=False)
    except Exception as exc:  # urllib raises a zoo of network errors
        raise WeightsUnavailableError(NAME, f"download failed: {exc}") from exc


class ResNet50Embedder(TorchEmbedder):
    family = "torchvision"
    supports_text = False

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        checkpoint: str | None = None,
        allow_download: bool = True,
        random_init: bool = False,
    ) -> None:
        module = models.resnet50(weights=None)
        if not random_init:
            state = _load_state(checkpoint, allow_download)
            # Checkpoints saved from our own feature extractor have no fc; the head is dropped anyway.
            missing, unexpected = module.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
            if bad:
                raise WeightsUnavailableError(NAME, f"checkpoint does not match resnet50: {bad[:5]}")
        module.fc = torch.nn.Identity()
        params: dict[str, Any] = {
            "family": self.family,
            "architecture": NAME,
            "weights": "random-init" if random_init else str(WEIGHTS),
            "image_size": CROP,
            "resize": RESIZE,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bilinear",
            "pooling": "global average (fc removed)",
        }
        super().__init__(
            name=NAME,
            dimension=DIMENSION,
            module=module,
            preprocess=make_preprocess(),
            params=params,
            device=device,
            precision=precision,
        )

    def image_graph(self) -> torch.nn.Module:
        module: torch.nn.Module = self.module  # fc is Identity: the forward pass is the pooled features
        return module
