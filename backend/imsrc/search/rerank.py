"""Re-ranking comparators (issue 18, item 3, minimal form): re-score the first candidates of stage 2 by a
classic image comparison between the query and each candidate's stored thumbnail.

Thumbnails, not originals: they are in the database already (one query for all candidates), at most a few
hundred pixels a side, and every comparator here works on a 64x64 copy anyway. SSIM is the standard one
(Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range 255, mean of the map; a test
checks it against scikit-image's); histogram is the intersection of 8x8x8 RGB histograms; pixel is one minus
the mean absolute grey-level difference. ORB and SIFT (OpenCV keypoints, RANSAC inliers) are in keypoints.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.orm import Session

SIDE = 64  # both images are compared at SIDE x SIDE
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def prepare(img: Image.Image) -> np.ndarray:
    """RGB at SIDE x SIDE as float64 (h, w, 3)."""
    small = img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float64)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.ndimage import gaussian_filter  # scipy comes with imagehash

    x, y = _grey(a), _grey(b)

    def blur(v: np.ndarray) -> np.ndarray:
        return np.asarray(gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect"))

    n = 11 * 11  # sample covariance over the 11x11 window the Gaussian spans (as scikit-image)
    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx * mx) * n / (n - 1)
    vy = (blur(y * y) - my * my) * n / (n - 1)
    cxy = (blur(x * y) - mx * my) * n / (n - 1)
    smap = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
    pad = 5  # the border half a window wide is left out (as scikit-image)
    return float(smap[pad:-pad, pad:-pad].mean())


def histogram(a: np.ndarray, b: np.ndarray) -> float:
    def hist(v: np.ndarray) -> np.ndarray:
        bins = (v.astype(np.int64) // 32).reshape(-1, 3)
        counts = np.bincount(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], minlength=512)
        return counts / counts.sum()

    return float(np.minimum(hist(a), hist(b)).sum())


def pixel(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.abs(_grey(a) - _grey(b)).mean() / 255.0)


SCORERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"ssim": ssim, "histogram": histogram, "pixel": pixel}


class ThumbnailRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def images(self, image_ids: Sequence[int]) -> dict[int, Image.Image]:
        """Decoded thumbnails of the given images (those that have one), in one query."""
        if not image_ids:
            return {}
        rows = self.session.execute(
            text("SELECT image_id, data FROM thumbnails WHERE image_id = ANY(:ids)"), {"ids": list(image_ids)}
        )
        out = {}
        for image_id, data in rows:
            with Image.open(io.BytesIO(bytes(data)), formats=["WEBP"]) as img:
                img.load()
                out[int(image_id)] = img.copy()
        return out


def scores(comparator: str, query: Image.Image, candidates: dict[int, Image.Image]) -> dict[int, float]:
    if comparator in ("orb", "sift"):
        from imsrc.search import keypoints

        return keypoints.scores(comparator, query, candidates)
    score = SCORERS[comparator]
    q = prepare(query)
    return {i: round(score(q, prepare(img)), 6) for i, img in candidates.items()}
