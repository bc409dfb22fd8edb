"""Stage-1 calibration (search/calibration.py): the fitted temperature follows how far apart a catalog's
categories are, reaches the coverage asked for, and its counting agrees with the service's rule."""

from __future__ import annotations

import numpy as np
import pytest

from imsrc.catalog.prototypes import PrototypeRow
from imsrc.search.calibration import fit, held_out_scores, picked_counts
from imsrc.search.stage1 import CategoryScore, choose, pick


def _scores(rng: np.random.Generator, n: int, categories: int, lead: float, noise: float) -> np.ndarray:
    """Scores per category; the own category (column 0) leads by `lead` on average."""
    s = rng.normal(0.5, noise, (n, categories))
    s[:, 0] += lead
    return s


@pytest.mark.parametrize("temperature", [0.003, 0.02, 0.05, 0.3])
def test_picked_counts_is_the_services_rule(temperature: float) -> None:
    rng = np.random.default_rng(1)
    scores = -np.sort(-rng.normal(0.6, 0.05, (200, 7)), axis=1)
    counts = picked_counts(scores, temperature, 0.9, 3)
    for row, n in zip(scores, counts, strict=True):
        ranked = [CategoryScore(c, str(c), float(s)) for c, s in enumerate(row)]
        assert len(choose(ranked, count=None, mass=0.9, cap=3, temperature=temperature)) == n


def test_separated_categories_get_one_category_and_overlapping_ones_more() -> None:
    rng = np.random.default_rng(2)
    own = np.zeros(1000, dtype=np.int64)
    apart = fit(_scores(rng, 1000, 10, lead=0.3, noise=0.02), own, mass=0.9, cap=3, target=0.98)
    assert apart["coverage"] >= 0.98 and apart["mean_categories"] < 1.05 and apart["top1"] == 1.0
    close = fit(_scores(rng, 1000, 10, lead=0.06, noise=0.02), own, mass=0.9, cap=3, target=0.98)
    assert close["coverage"] >= 0.98 and close["mean_categories"] > 1.5
    assert close["temperature"] > apart["temperature"]


def test_unreachable_target_takes_the_best_the_cap_allows() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(0.5, 0.05, (500, 10))  # no signal: the own category is anywhere
    got = fit(scores, np.zeros(500, dtype=np.int64), mass=0.9, cap=3, target=0.98)
    assert 0.2 < got["coverage"] < 0.45 and got["mean_categories"] > 2.9


def test_a_member_is_held_out_of_its_own_prototype() -> None:
    """A two-member category: its mean leans towards each member, so scored against the raw mean a member
    looks closer to its category than a new image of it would. Held out, it scores against the other member."""
    a = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    mean = (a + b) / np.linalg.norm(a + b)
    other = np.array([0.6, 0.0, 0.8], dtype=np.float32)
    protos = [PrototypeRow(1, "mean", 0, mean, 2), PrototypeRow(2, "mean", 0, other, 5)]
    own_cosine = {(1, 0): float(a @ mean)}
    scores, cats = held_out_scores(np.stack([a]), np.array([1]), protos, own_cosine)
    assert cats.tolist() == [1, 2]
    assert scores[0, 0] == pytest.approx(float(a @ b), abs=1e-6)  # 0: the other member alone
    assert scores[0, 1] == pytest.approx(0.6, abs=1e-6)  # other categories as they are


def test_with_the_fallback_the_target_is_reached_beyond_the_cap() -> None:
    """Close categories: cut at the cap, the best coverage is below the target; fitted for the fallback rule
    (over-cap queries search everything) the target is met and the share that falls back is reported."""
    rng = np.random.default_rng(4)
    scores = _scores(rng, 2000, 10, lead=0.08, noise=0.03)
    own = np.zeros(2000, dtype=np.int64)
    capped = fit(scores, own, mass=0.9, cap=3, target=0.99)
    assert capped["coverage"] < 0.99 and capped["over_cap"] == 0.0
    sure = fit(scores, own, mass=0.9, cap=3, target=0.99, fallback=True)
    assert sure["coverage"] >= 0.99 and 0.2 < sure["over_cap"] < 0.6
    # The over-cap share is the rule's own count: queries whose uncapped pick exceeds 3.
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order, axis=1)
    n = picked_counts(ranked, sure["temperature"], 0.9, 10)
    assert sure["over_cap"] == pytest.approx(float(np.mean(n > 3)))


def test_auto_is_the_uncapped_rule() -> None:
    """pick(..., "auto") is the rule without the cap: what the service compares with the cap (and with
    IMSRC_SEARCH_FALLBACK_CATEGORIES) to tell whether stage 1 is sure of a query."""
    scores = [0.80, 0.79, 0.78, 0.77, 0.5]
    ranked = [CategoryScore(c, str(c), s) for c, s in enumerate(scores)]
    assert len(pick(ranked, "auto", mass=0.9, cap=3, temperature=0.001)) == 1  # one category holds the mass
    assert len(pick(ranked, "auto", mass=0.9, cap=3, temperature=0.1)) == 4  # four close ones: over the cap
    assert len(pick(ranked, None, mass=0.9, cap=3, temperature=0.1)) == 3  # the default rule is cut at the cap
