"""The labelled set of bench/robustness: indexed photos (scikit-image's bundled samples, the large ones cut into
tiles so there are more than 50 distinct pictures and no picture is indexed twice), Fashion-MNIST distractors
(Debian's dataset-fashion-mnist), and the edits of every indexed photo that the benchmark searches with."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

# photo -> (columns, rows) of tiles; (1, 1) = the whole photo. No photo appears both whole and as tiles, so a
# crop of an indexed picture has exactly one right answer.
PHOTOS: dict[str, tuple[int, int]] = {
    "chelsea": (1, 1),
    "clock": (1, 1),
    "coins": (1, 1),
    "page": (1, 1),
    "text": (1, 1),
    "colorwheel": (1, 1),
    "brick": (1, 1),
    "grass": (1, 1),
    "gravel": (1, 1),
    "astronaut": (2, 2),
    "camera": (2, 2),
    "immunohistochemistry": (2, 2),
    "moon": (2, 2),
    "coffee": (2, 2),
    "rocket": (2, 2),
    "cell": (2, 2),
    "hubble_deep_field": (2, 2),
    "retina": (3, 3),
    "motorcycle": (3, 2),
}
GROUPS = {
    "textures": ("brick", "grass", "gravel"),
    "documents": ("page", "text", "clock"),
    "objects": ("chelsea", "coins", "colorwheel"),
}


@dataclass(frozen=True)
class Indexed:
    name: str
    category: str
    image: Image.Image


def _load(name: str) -> Image.Image:
    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def photos() -> list[Indexed]:
    out = []
    for name, (cols, rows) in PHOTOS.items():
        img = _load(name)
        category = next((g for g, names in GROUPS.items() if name in names), name)
        if (cols, rows) == (1, 1):
            out.append(Indexed(name, category, img))
            continue
        w, h = img.width // cols, img.height // rows
        for r in range(rows):
            for c in range(cols):
                out.append(Indexed(f"{name}-{r}{c}", category, img.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))))
    return out


def distractors(n: int) -> list[Indexed]:
    """The first n Fashion-MNIST test images, 28 px scaled to 112 px, their class as category."""
    from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

    if n <= 0:
        return []
    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    return [
        Indexed(
            f"fashion-{i:05d}",
            f"fashion {FASHION_CLASSES[labels[i]]}",
            Image.fromarray(images[i]).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC),
        )
        for i in range(n)
    ]


def encode(img: Image.Image, fmt: str = "PNG", **kw: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _crop(img: Image.Image, fx: float, fy: float, x: float, y: float) -> Image.Image:
    """A window fx x fy (fractions) whose top-left corner is at (x, y) of the free room."""
    w, h = round(img.width * fx), round(img.height * fy)
    left, top = round((img.width - w) * x), round((img.height - h) * y)
    return img.crop((left, top, left + w, top + h))


CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))
SIDES = ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5))
HALF = math.sqrt(0.5)

# edit -> (group in the targets, how to make it from the i-th photo)
EDITS: dict[str, tuple[str, Callable[[Image.Image, int], bytes]]] = {
    "jpeg25_half": (
        "copy",
        lambda im, i: encode(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), "JPEG", quality=25),
    ),
    "resized_75_jpeg70": (
        "copy",
        lambda im, i: encode(
            im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BILINEAR), "JPEG", quality=70
        ),
    ),
    "rotated_12": (
        "geometric",
        lambda im, i: encode(im.rotate(12 if i % 2 else -12, Image.Resampling.BICUBIC), "JPEG", quality=90),
    ),
    "rotated_12_brighter_30": (
        "geometric",
        lambda im, i: encode(
            ImageEnhance.Brightness(im.rotate(12 if i % 2 else -12, Image.Resampling.BICUBIC)).enhance(1.3),
            "JPEG",
            quality=90,
        ),
    ),
    "brighter_30": ("geometric", lambda im, i: encode(ImageEnhance.Brightness(im).enhance(1.3), "JPEG", quality=90)),
    "darker_30": ("geometric", lambda im, i: encode(ImageEnhance.Brightness(im).enhance(0.7), "JPEG", quality=90)),
    "mirrored": ("geometric", lambda im, i: encode(ImageOps.mirror(im))),
    "crop_centre_50": ("crop", lambda im, i: encode(_crop(im, HALF, HALF, 0.5, 0.5), "JPEG", quality=90)),
    "crop_corner_25": ("crop", lambda im, i: encode(_crop(im, 0.5, 0.5, *CORNERS[i % 4]), "JPEG", quality=90)),
    "crop_side_30": ("crop", lambda im, i: encode(_crop(im, 0.55, 0.55, *SIDES[i % 4]), "JPEG", quality=90)),
}
