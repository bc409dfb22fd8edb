"""ORB and SIFT re-ranking (issue 18, item 3): local features matched between the query and a candidate's
thumbnail, a RANSAC homography fitted to the matches, and the number of inliers as the score.

Why these choices:
- Thumbnails (IMSRC_THUMBNAIL_SIZE, 256 px a side by default), and both images brought to the same longest side
  (SIDE) before detection: smaller ones are enlarged, so a 112-px thumbnail or a half-size query is matched at the
  scale of its copy, and a candidate costs a few ms instead of tens of ms on full originals (bench/robustness
  reports the cost).
- Contrast-limited adaptive histogram equalisation (CLAHE) on the grey image before detection: a brighter or
  darker copy then has the same local contrast as its original, and low-texture pictures (sky, micrographs, a
  WEBP thumbnail's smoothed grain) get keypoints at all. With the detectors' default thresholds such pictures gave
  0-3 keypoints and never matched their own copies (bench/robustness/diagnose.py found every miss there);
  the detector thresholds are lowered for the same reason, with the feature count capped so the cost stays bounded.
- Lowe's ratio test (0.75), then one match per candidate keypoint (the closest): many query points matched to the
  same few candidate points are what let RANSAC fit a degenerate mapping between unrelated pictures.
- RANSAC (reprojection error 5 px) keeps the matches one plane-to-plane mapping explains, which an edited copy or a
  crop of the same picture has and a merely similar picture does not; the mapping must also be one an edit can make
  (plausible): it keeps orientation (mirrors are tried separately), scales by 1/8-8, stretches one axis at most 4x
  more than the other and has little perspective. A fit that folds or collapses the picture scores 0.
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
SIDE = 256  # both images are scaled to this longest side (thumbnails are at most this large by default)
MIN_SIDE = 16  # smaller images cannot hold ORB's 31 px patch at any pyramid level
MAX_FEATURES = 500  # per image and detector: bounds the matching cost
CLAHE_CLIP, CLAHE_TILES = 2.0, 8  # OpenCV's usual clip limit, on an 8x8 grid of tiles
ORB_FAST_THRESHOLD = 5  # OpenCV's default 20 finds nothing on low-contrast pictures
SIFT_CONTRAST_THRESHOLD = 0.01  # OpenCV's default 0.04, likewise
# what a plausible edit does to the picture (see the module docstring)
MAX_SCALE, MAX_STRETCH, MIN_PERSPECTIVE_W = 8.0, 4.0, 0.5


@dataclass(frozen=True)
class Features:
    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray | None
    size: tuple[int, int] = (0, 0)  # (width, height) of the grey image the points are in


def _cv2() -> Any:
    import cv2  # opencv-python-headless; imported on first use (keypoint comparators only)

    return cv2


def _detector(kind: str) -> Any:
    cv2 = _cv2()
    if kind == "orb":
        return cv2.ORB_create(nfeatures=MAX_FEATURES, fastThreshold=ORB_FAST_THRESHOLD)
    return cv2.SIFT_create(nfeatures=MAX_FEATURES, contrastThreshold=SIFT_CONTRAST_THRESHOLD)


def normalised_grey(img: Image.Image, side: int = SIDE) -> np.ndarray:
    """Grey, longest side `side` (enlarged or reduced), local contrast equalised (CLAHE)."""
    grey = img.convert("L")
    scale = side / max(grey.size)
    if scale != 1:
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BILINEAR)
    arr = np.asarray(grey, dtype=np.uint8)
    return np.asarray(_cv2().createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(arr))


def _none() -> Features:
    return Features(np.empty((0, 2), dtype=np.float32), None)


def features(kind: str, img: Image.Image, detector: Any = None) -> Features:
    """Keypoints of an image; none for pictures too small to hold a descriptor patch (ORB's image pyramid
    fails an OpenCV assertion on a 1x1 image, which made rerank=orb a 500 on such a query)."""
    if min(img.size) < MIN_SIDE:
        return _none()
    grey = normalised_grey(img)
    if min(grey.shape) < MIN_SIDE:
        return _none()
    detector = detector or _detector(kind)
    try:
        keypoints, descriptors = detector.detectAndCompute(grey, None)
    except _cv2().error:  # a degenerate image OpenCV rejects has no usable features, which scores 0
        return _none()
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    return Features(points, descriptors, (grey.shape[1], grey.shape[0]))


def plausible(homography: np.ndarray | None, size: tuple[int, int]) -> bool:
    """Could an edit (resize, crop, rotation, small perspective) map the query to the candidate this way?"""
    if homography is None or not np.all(np.isfinite(homography)):
        return False
    h = homography / homography[2, 2] if homography[2, 2] != 0 else homography
    linear = h[:2, :2]
    det = float(np.linalg.det(linear))
    if det <= 0:  # a reflection (mirrors are matched as such) or a collapse to a line
        return False
    singular = np.linalg.svd(linear, compute_uv=False)
    if not (1 / MAX_SCALE <= np.sqrt(det) <= MAX_SCALE) or singular[0] > MAX_STRETCH * singular[1]:
        return False
    w, hgt = size
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, hgt, 1], [w, hgt, 1]], dtype=np.float64)
    depth = corners @ h[2]
    return bool(np.all(depth >= MIN_PERSPECTIVE_W) and np.all(depth <= 1 / MIN_PERSPECTIVE_W))


def inliers(kind: str, query: Features, candidate: Features) -> int:
    """RANSAC homography inliers among the ratio-test matches, one per candidate keypoint (0 when too few to
    fit one, or when the fitted mapping is not one an edit makes)."""
    if query.descriptors is None or candidate.descriptors is None or len(query.points) < 4 or len(candidate.points) < 4:
        return 0
    cv2 = _cv2()
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING if kind == "orb" else cv2.NORM_L2)
    pairs = matcher.knnMatch(query.descriptors, candidate.descriptors, k=2)
    best: dict[int, Any] = {}
    for p in pairs:
        if len(p) == 2 and p[0].distance < RATIO * p[1].distance:
            m = p[0]
            if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
                best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < 4:
        return 0
    src = query.points[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = candidate.points[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_PX)
    if mask is None or not plausible(homography, query.size):
        return 0
    return int(mask.sum())


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
