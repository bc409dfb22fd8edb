"""The images bench/embed's scripts embed: 8 scikit-image photos x 8 crops/flips (64 distinct images), so each
photo's edits are its true neighbours. One pool, so run.py and engines.py measure on the same pictures."""

from __future__ import annotations

from PIL import Image, ImageOps
from skimage import data

PHOTOS = ["chelsea", "coffee", "astronaut", "camera", "rocket", "coins", "immunohistochemistry", "page"]


def image_pool() -> list[Image.Image]:
    out = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        for i in range(8):
            m = (i % 4 + 1) * min(w, h) // 20
            crop = im.crop((m, m // 2, w - m // 2, h - m))
            out.append(ImageOps.mirror(crop) if i >= 4 else crop)
    return out
