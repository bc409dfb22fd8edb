"""Automatic categories: uncategorised images are grouped by k-means so two-stage search reaches them too.

An image the user has not labelled gets images.category_id = an automatic category (is_automatic = true),
so stage 2's per-category structures cover it like any other. The grouping is redone from scratch only when
the uncategorised set has grown by settings.autogroup_growth since the last grouping (the count is kept in
search_state); in between, new uncategorised images join their nearest automatic category. Renaming an
automatic category makes it a real one, and its images then count as labelled.
"""

from __future__ import annotations

import math

import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository
from imsrc.config import Settings
from imsrc.search.kmeans import spherical_kmeans
from imsrc.search.repository import SearchStateRepository, VectorRepository

KMEANS_SAMPLE = 20_000
AUTO_DESCRIPTION = "Automatic group of uncategorised images (k-means); rename it to make it a real category"


def _state_key(model_id: int) -> str:
    return f"autogroup:m{int(model_id)}"


def group_count(n: int, cap: int) -> int:
    """About sqrt(n/2) groups: 50 images -> 5, 5,000 -> 50; a common rule of thumb for k."""
    return max(1, min(cap, round(math.sqrt(n / 2))))


def plan(session: Session, settings: Settings, *, model_id: int, force: bool = False) -> str | None:
    """What autogroup would do now: "regroup", "join" (new uncategorised images into existing groups) or None."""
    auto_ids = CategoryRepository(session).automatic_ids()
    counts = VectorRepository(session).category_counts(model_id)
    new = counts.get(None, 0)
    total = new + sum(counts.get(c, 0) for c in auto_ids)
    grouped = int(SearchStateRepository(session).get(_state_key(model_id)).get("grouped", 0))
    if total == 0:
        return None
    if force or not auto_ids or grouped == 0 or total >= grouped * (1 + settings.autogroup_growth):
        return "regroup"
    return "join" if new else None


def autogroup(
    session: Session,
    settings: Settings,
    *,
    model_id: int,
    dimension: int,
    force: bool = False,
    may_regroup: bool = True,
) -> set[int]:
    """Group or extend. Returns the automatic categories whose members changed (their prototypes are stale).
    may_regroup=False (the caller holds the automatic-groups lock only shared, see catalog.locks): a regroup that
    has become due is left to the next writer, and new images join the existing groups meanwhile."""
    step = plan(session, settings, model_id=model_id, force=force)
    if step is None:
        return set()
    auto_ids = CategoryRepository(session).automatic_ids()
    if step == "regroup" and may_regroup:
        return _regroup(session, settings, model_id=model_id, dimension=dimension, auto_ids=auto_ids)
    if not auto_ids or VectorRepository(session).category_counts(model_id).get(None, 0) == 0:
        return set()  # a regroup is due but left to a writer holding the lock exclusively; nothing to join
    return _join_nearest(session, model_id=model_id, dimension=dimension, auto_ids=auto_ids)


def _regroup(session: Session, settings: Settings, *, model_id: int, dimension: int, auto_ids: list[int]) -> set[int]:
    cats = CategoryRepository(session)
    batch = VectorRepository(session).fetch(
        model_id, dimension, category_ids=auto_ids or None, uncategorised=not auto_ids
    )
    if auto_ids:  # members of the old groups plus the images that arrived since
        extra = VectorRepository(session).fetch(model_id, dimension, uncategorised=True)
        ids = np.concatenate([batch.image_ids, extra.image_ids])
        x = np.concatenate([batch.vectors, extra.vectors])
    else:
        ids, x = batch.image_ids, batch.vectors
    k = group_count(len(ids), settings.autogroup_max_categories)
    sample = x if len(x) <= KMEANS_SAMPLE else x[np.random.default_rng(0).choice(len(x), KMEANS_SAMPLE, False)]
    centres, _ = spherical_kmeans(sample, k, seed=0)
    labels = np.argmax(x @ centres.T, axis=1)
    cats.delete(auto_ids)
    new_ids: list[int] = []
    number = 1
    for j in range(len(centres)):
        members = int((labels == j).sum())
        if members == 0:
            new_ids.append(-1)
            continue
        while cats.by_name(f"auto-{number:03d}") is not None:
            number += 1
        # No member count in the text: newcomers join between regroups and deletes leave, so a count written
        # now would soon contradict the live image_count shown beside it.
        new_ids.append(cats.create_automatic(f"auto-{number:03d}", AUTO_DESCRIPTION))
        number += 1
    mapping = np.asarray(new_ids, dtype=np.int64)
    cats.assign(ids, mapping[labels])
    SearchStateRepository(session).put(_state_key(model_id), {"grouped": len(ids), "groups": len(centres)})
    return {c for c in new_ids if c > 0}


def _join_nearest(session: Session, *, model_id: int, dimension: int, auto_ids: list[int]) -> set[int]:
    protos = [
        p for p in PrototypeRepository(session).load(model_id, ("mean", "cluster")) if p.category_id in set(auto_ids)
    ]
    if not protos:
        return _regroup_all(session, model_id=model_id, dimension=dimension, auto_ids=auto_ids)
    batch = VectorRepository(session).fetch(model_id, dimension, uncategorised=True)
    owners = np.array([p.category_id for p in protos], dtype=np.int64)
    matrix = np.stack([p.vector for p in protos])
    chosen = owners[np.argmax(batch.vectors @ matrix.T, axis=1)]
    CategoryRepository(session).assign(batch.image_ids, chosen)
    return {int(c) for c in np.unique(chosen)}


def _regroup_all(session: Session, *, model_id: int, dimension: int, auto_ids: list[int]) -> set[int]:
    # Automatic categories without prototypes (e.g. made by another model): put newcomers in the first one
    # rather than leave them unreachable; the next regroup sorts them properly.
    batch = VectorRepository(session).fetch(model_id, dimension, uncategorised=True)
    target = min(auto_ids)
    CategoryRepository(session).assign(batch.image_ids, np.full(len(batch), target, dtype=np.int64))
    return {target}
