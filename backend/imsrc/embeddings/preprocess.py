"""Image preprocessing in PIL + NumPy, giving the arrays the models' torchvision transforms give, without torch.

torchvision's Resize and CenterCrop on a PIL image are PIL's resize and crop; ToTensor is the uint8 pixels / 255
in float32; Normalize is (x - mean) / std in float32. The same PIL calls and the same float32 operations give the
same numbers, bit for bit. A transform is translated step by step (`spec_of`); one with a step not known here is
not translated (its model keeps torch for preprocessing), and a translation is used only after it reproduced the
torch transform exactly on check images (embeddings.direct), so a torchvision change cannot slip through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# torchvision InterpolationMode values -> PIL resampling filters (torchvision's own pil_modes_mapping).
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
Step = dict[str, Any]


def spec_of(transform: Any) -> list[Step] | None:
    """The steps of a torchvision Compose (as built for our models: torchvision's and open_clip's eval transforms),
    as plain data; None when a step is not one of those known here. Looked up by class name, so this needs no
    torchvision import (the transform passed in comes from a process that has it)."""
    steps: list[Step] = []
    for t in getattr(transform, "transforms", None) or []:
        kind = type(t).__name__
        if kind == "Resize":
            size = t.size if isinstance(t.size, int) else list(t.size)
            interpolation = getattr(t.interpolation, "value", t.interpolation)
            if interpolation not in _PIL_FILTERS or getattr(t, "max_size", None) is not None:
                return None
            steps.append({"op": "resize", "size": size, "interpolation": interpolation})
        elif kind == "CenterCrop":
            steps.append({"op": "center_crop", "size": [int(v) for v in t.size]})
        elif kind in ("ToRGB", "MaybeConvertMode") or getattr(t, "__name__", "") == "_convert_to_rgb":
            mode = getattr(t, "mode", "RGB")
            if mode != "RGB":
                return None
            steps.append({"op": "rgb"})
        elif kind in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_float"})
        elif kind == "Normalize":
            steps.append({"op": "normalize", "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std]})
        else:
            return None
    # The pixels must be RGB bytes when they become floats (other modes are not what the models were built for).
    ops = [s["op"] for s in steps]
    if "to_float" not in ops or "rgb" not in ops[: ops.index("to_float")]:
        return None
    return steps


def _resize(image: Image.Image, size: int | list[int], interpolation: str) -> Image.Image:
    """torchvision.transforms.functional.resize on a PIL image (its _compute_resized_output_size, then PIL)."""
    w, h = image.size
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = requested, int(requested * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_h, new_w) == (h, w):
        return image
    return image.resize((new_w, new_h), _PIL_FILTERS[interpolation])


def _center_crop(image: Image.Image, size: list[int]) -> Image.Image:
    """torchvision's center_crop on a PIL image: zero padding where the image is smaller, then PIL's crop."""
    crop_h, crop_w = size if len(size) == 2 else (size[0], size[0])
    w, h = image.size
    if crop_w > w or crop_h > h:
        left, top = (crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0
        padded = Image.new(image.mode, (w + max(crop_w - w, 0), h + max(crop_h - h, 0)))  # zeros, like torchvision
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
        if (crop_w, crop_h) == (w, h):
            return image
    top, left = round((h - crop_h) / 2.0), round((w - crop_w) / 2.0)  # int(round(...)) in torchvision
    return image.crop((left, top, left + crop_w, top + crop_h))


class ImagePreprocess:
    """PIL image -> (3, H, W) float32 C-contiguous array. Picklable (plain data), so ingest worker processes
    receive it without importing torch."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self._mean_std = next(
            (
                (np.asarray(s["mean"], np.float32)[:, None, None], np.asarray(s["std"], np.float32)[:, None, None])
                for s in steps
                if s["op"] == "normalize"
            ),
            None,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels: Any = image
        for step in self.steps:
            op = step["op"]
            if op == "resize":
                pixels = _resize(pixels, step["size"], step["interpolation"])
            elif op == "center_crop":
                pixels = _center_crop(pixels, step["size"])
            elif op == "rgb":
                pixels = pixels.convert("RGB")
            elif op == "to_float":
                # HWC uint8 -> CHW float32 / 255, as torchvision's to_tensor (float32 division, same rounding).
                pixels = np.asarray(pixels, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
            elif op == "normalize":
                assert self._mean_std is not None
                mean, std = self._mean_std
                pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["steps"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ImagePreprocess({self.steps})"
