"""ORB and SIFT re-ranking (issue 18, item 3): local features matched between the query and a candidate's
thumbnail, a RANSAC homography fitted to the matches, and the number of inliers as the score.

Why these choices:
- Thumbnails (IMSRC_THUMBNAIL_SIZE, 256 px a side by default) and the query scaled to the same size: the
  features of a re-compressed, resized, rotated or brighter copy are found at that size already, and a
  candidate costs ~1-3 ms instead of tens of ms on full originals (bench/robustness reports the cost).
- Lowe's ratio test (0.75) keeps distinctive matches only; RANSAC (reprojection error 5 px) keeps those one
  plane-to-plane mapping explains, which is what an edited copy or a crop of the same picture has and a merely
  similar picture does not.
- Keypoint descriptors are not mirror-invariant, so the query is also matched mirrored and the better of the
  two counts: a mirrored copy is an edit users ask to find.
- Fewer than MIN_INLIERS inliers says nothing (random matches reach a handful): such candidates score 0 and
  keep their embedding order behind the geometric matches (service._reranked sorts ties by cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

RATIO = 0.75
RANSAC_PX = 5.0
MIN_INLIERS = 8
SIDE = 256  # the query is scaled to this many pixels a side at most, as thumbnails are
ORB_FEATURES = 500
MIN_SIDE = 16  # smaller images cannot hold ORB's 31 px patch at any pyramid level


@dataclass(frozen=True)
class Features:
    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray | None


def _cv2() -> Any:
    import cv2  # opencv-python-headless; imported on first use (keypoint comparators only)

    return cv2


def _detector(kind: str) -> Any:
    cv2 = _cv2()
    if kind == "orb":
        return cv2.ORB_create(nfeatures=ORB_FEATURES)
    return cv2.SIFT_create()


def _grey(img: Image.Image, side: int = SIDE) -> np.ndarray:
    small = img.convert("L")
    if max(small.size) > side:
        small = small.copy()
        small.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def features(kind: str, img: Image.Image, detector: Any = None) -> Features:
    """Keypoints of an image; none for pictures too small to hold a descriptor patch (ORB's image pyramid
    fails an OpenCV assertion on a 1x1 image, which made rerank=orb a 500 on such a query)."""
    grey = _grey(img)
    if min(grey.shape) < MIN_SIDE:
        return Features(np.empty((0, 2), dtype=np.float32), None)
    detector = detector or _detector(kind)
    try:
        keypoints, descriptors = detector.detectAndCompute(grey, None)
    except _cv2().error:  # a degenerate image OpenCV rejects has no usable features, which scores 0
        return Features(np.empty((0, 2), dtype=np.float32), None)
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    return Features(points, descriptors)


def inliers(kind: str, query: Features, candidate: Features) -> int:
    """RANSAC homography inliers among the ratio-test matches (0 when too few to fit one)."""
    if query.descriptors is None or candidate.descriptors is None or len(query.points) < 4 or len(candidate.points) < 4:
        return 0
    cv2 = _cv2()
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING if kind == "orb" else cv2.NORM_L2)
    pairs = matcher.knnMatch(query.descriptors, candidate.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < 4:
        return 0
    src = query.points[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = candidate.points[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_PX)
    return 0 if mask is None else int(mask.sum())


def scores(kind: str, query: Image.Image, candidates: dict[int, Image.Image]) -> dict[int, float]:
    """Inliers per candidate (the better of the query and its mirror image); below MIN_INLIERS: 0."""
    detector = _detector(kind)
    views = [features(kind, query, detector), features(kind, ImageOps.mirror(query), detector)]
    out: dict[int, float] = {}
    for image_id, img in candidates.items():
        found = features(kind, img, detector)
        best = max(inliers(kind, v, found) for v in views)
        out[image_id] = float(best if best >= MIN_INLIERS else 0)
    return out
