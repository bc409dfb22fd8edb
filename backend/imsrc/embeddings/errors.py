"""Domain errors of the model layer.

Each carries ``status_code`` and ``code`` so the API's single error handler (and the CLI) can map them
without this package knowing about HTTP frameworks.
"""

from __future__ import annotations

from collections.abc import Iterable

from imsrc.errors import ImsrcError


class ModelError(ImsrcError):
    """Subclass of ImsrcError so the API's one handler and the CLI's one-line errors cover model errors too."""

    status_code: int = 500
    code: str = "model_error"


class UnknownModelError(ModelError):
    status_code = 404
    code = "unknown_model"

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"unknown model {name!r}; known models: {', '.join(self.known)} "
            "(or 'auto', or the generic form 'open_clip:MODEL:PRETRAINED', e.g. 'open_clip:ViT-B-32:openai')"
        )


class TextNotSupportedError(ModelError):
    status_code = 400
    code = "text_not_supported"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"model {name!r} encodes images only; text search needs a CLIP-family model (e.g. clip-vit-b-32)"
        )


class WeightsUnavailableError(ModelError):
    status_code = 503
    code = "weights_unavailable"

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        hint = (
            f"weights for model {name!r} are not available offline. Provide them by either: "
            "running once with internet access (they are then cached: open_clip/Hugging Face cache "
            "~/.cache/huggingface, torchvision cache ~/.cache/torch/hub), or setting "
            "IMSRC_MODEL_CHECKPOINT to a local checkpoint file"
        )
        super().__init__(f"{hint}: {detail}" if detail else hint)


class OnnxRuntimeMissingError(ModelError):
    status_code = 503
    code = "onnxruntime_missing"

    def __init__(self, setting: str) -> None:
        super().__init__(
            f"IMSRC_INFERENCE={setting} needs the Python package 'onnxruntime', which is not installed "
            "(pip install onnxruntime), or set IMSRC_INFERENCE=torch"
        )


class InferenceConfigError(ModelError):
    """A runtime setting that cannot work with the other model settings (e.g. ONNX on a CUDA device)."""

    status_code = 400
    code = "inference_config"
