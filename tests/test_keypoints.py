"""The ORB/SIFT comparators on their own (no database): real scikit-image photos, edited with Pillow, compared
with thumbnails made by the ingest code, as the search service compares them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage import data

from imsrc.ingest.decode import make_thumbnail
from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, read_idx
from imsrc.search import keypoints


def _thumb(img: Image.Image) -> Image.Image:
    webp, _, _ = make_thumbnail(img, 256)
    with Image.open(io.BytesIO(webp)) as t:
        return t.convert("RGB")


def _jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _tile(name: str, cols: int, rows: int, col: int, row: int) -> Image.Image:
    arr = getattr(data, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    w, h = img.width // cols, img.height // rows
    return img.crop((col * w, row * h, (col + 1) * w, (row + 1) * h))


@pytest.mark.parametrize("kind", ["orb", "sift"])
@pytest.mark.parametrize(
    ("photo", "grid", "source", "sibling"),
    [
        ("cell", (2, 2), (0, 1), (0, 0)),  # a faint micrograph: 1-3 keypoints with the detectors' defaults
        ("rocket", (2, 2), (0, 0), (1, 0)),  # mostly sky
        ("retina", (3, 3), (1, 1), (2, 0)),  # dark, smooth fundus
    ],
)
def test_low_texture_copies_rotated_and_brighter_match_their_source_only(
    kind: str, photo: str, grid: tuple[int, int], source: tuple[int, int], sibling: tuple[int, int]
) -> None:
    """A tile rotated 12 degrees and 30 % brighter is matched to its own thumbnail and not to the next tile of the
    same photo. Before CLAHE and the lower detector thresholds the source scored 0 on all three (as the sibling),
    so the embedding's order decided, and put a sibling first in bench/robustness."""
    original = _tile(photo, *grid, *source)
    query = _jpeg(ImageEnhance.Brightness(original.rotate(12, Image.Resampling.BICUBIC)).enhance(1.3))
    got = keypoints.scores(kind, query, {1: _thumb(original), 2: _thumb(_tile(photo, *grid, *sibling))})
    assert got[1] >= 2 * keypoints.MIN_INLIERS, got
    assert got[2] == 0.0, got


@pytest.mark.parametrize("kind", ["orb", "sift"])
def test_a_small_copy_is_enlarged_to_the_thumbnail_scale(kind: str) -> None:
    """A half-size JPEG copy (128 px) of a 256-px picture is brought to the thumbnail's scale before detection,
    darker too: its features are found at the same size as the original's."""
    original = _tile("camera", 2, 2, 1, 0)
    small = ImageEnhance.Brightness(original.resize((128, 128), Image.Resampling.LANCZOS)).enhance(0.7)
    got = keypoints.scores(kind, _jpeg(small, 50), {1: _thumb(original), 2: _thumb(_tile("camera", 2, 2, 0, 1))})
    assert got[1] >= 2 * keypoints.MIN_INLIERS and got[2] == 0.0, got


def test_implausible_mappings_are_refused() -> None:
    size = (256, 256)
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 30], [np.sin(angle), np.cos(angle), -10], [0, 0, 1]])
    assert keypoints.plausible(rotation, size)
    assert keypoints.plausible(np.diag([0.5, 0.5, 1.0]), size)  # a crop enlarged, or the query a quarter of it
    assert not keypoints.plausible(np.diag([-1.0, 1.0, 1.0]), size)  # a reflection
    assert not keypoints.plausible(np.array([[1.0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1]]), size)  # onto a line
    assert not keypoints.plausible(np.diag([0.05, 0.05, 1.0]), size)  # 20x smaller
    assert not keypoints.plausible(np.diag([4.0, 0.5, 1.0]), size)  # one axis stretched 8x against the other
    assert not keypoints.plausible(np.array([[1.0, 0, 0], [0, 1.0, 0], [-0.0159, 0.0233, 1.0]]), size)  # perspective
    assert not keypoints.plausible(None, size)
    assert not keypoints.plausible(np.full((3, 3), np.nan), size)


def test_degenerate_fits_between_unrelated_pictures_score_zero() -> None:
    """A half-size JPEG of a retina tile against unrelated pictures (the other photos' thumbnails, a shirt from
    Fashion-MNIST scaled up like bench/robustness's distractors): no candidate reaches MIN_INLIERS. Before one
    match per candidate keypoint and the plausibility check, SIFT fitted a folded 'homography' with 26 inliers
    to a Fashion-MNIST image (bench/robustness/diagnose.py)."""
    retina = _tile("retina", 3, 3, 2, 0)
    query = _jpeg(retina.resize((retina.width // 2, retina.height // 2), Image.Resampling.LANCZOS), 25)
    others = {i: _thumb(_tile(name, 1, 1, 0, 0)) for i, name in enumerate(("coins", "camera", "moon", "brick"))}
    if DEBIAN_FASHION_MNIST.exists():
        shirt = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[93]
        others[4] = _thumb(Image.fromarray(shirt).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC))
    for kind in ("orb", "sift"):
        got = keypoints.scores(kind, query, {**others, 99: _thumb(retina)})
        assert all(got[i] == 0.0 for i in others), (kind, got)
        assert got[99] >= keypoints.MIN_INLIERS, (kind, got)
